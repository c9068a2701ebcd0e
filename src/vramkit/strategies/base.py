"""Strategy configs and the registry that dispatches them.

A strategy is a small frozen dataclass (the *config*: what to do, with which arguments) plus one
function registered for that config type (the *mechanism*: how to do it to a pipeline). Adding a
strategy is one dataclass and one ``@register_strategy(Config)`` function, as in torchao's
``quantize_(model, Config())``.

The registered function has the signature ``apply(pipe, config, component) -> Undo | None`` and
returns a callable that undoes exactly what it did, or ``None`` when the step cannot be undone
(the step's ``reversible`` is then ``False``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from ..errors import InvalidRequestError, VramkitError

__all__ = [
    "Strategy",
    "Undo",
    "ApplyFn",
    "register_strategy",
    "get_apply_fn",
    "strategy_types",
    "strategy_from_dict",
    "parse_dtype",
]

Undo = Callable[[], None]
ApplyFn = Callable[[Any, "Strategy", "str | None"], "Undo | None"]

_REGISTRY: dict[type[Strategy], ApplyFn] = {}
_BY_NAME: dict[str, type[Strategy]] = {}

_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """``"bf16"``, ``"fp16"``, ``"fp32"`` (or a ``torch.dtype``) to a ``torch.dtype``."""
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise InvalidRequestError(f"dtype {value} is not supported here; use bf16, fp16 or fp32.")
        return value
    key = str(value).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise InvalidRequestError(f"Unknown dtype {value!r}; use one of 'bf16', 'fp16', 'fp32'.")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


@dataclass(frozen=True)
class Strategy:
    """Base class of every strategy config.

    Class attributes each subclass sets:

    - ``name``: stable name used in plans, JSON and messages.
    - ``lossless``: ``True`` when the output stays bit-identical (``step_lossless`` may refine it).
    - ``reversible``: ``True`` when ``vramkit.restore`` can undo it.
    - ``conflicts_with``: names of strategies that cannot share a component with this one.
    - ``order``: where it goes in the safe application order (lower first).
    - ``pipeline_wide``: applies once to the pipeline (component ``None``) rather than per component.
    - ``default_components``: components targeted when ``components`` is not given.
    """

    name: ClassVar[str] = "Strategy"
    lossless: ClassVar[bool] = True
    reversible: ClassVar[bool] = True
    conflicts_with: ClassVar[frozenset[str]] = frozenset()
    order: ClassVar[int] = 50
    pipeline_wide: ClassVar[bool] = False
    default_components: ClassVar[tuple[str, ...]] = ("transformer",)
    # A pipeline-wide step with no explicit ``components`` normally touches every component; one that
    # yields to placed components (ModelOffload, PromptCache) only takes those no other step placed.
    yields_to_placed: ClassVar[bool] = False

    def check(self, pipe: Any, component: str | None) -> None:
        """Raise a :mod:`vramkit.errors` exception if this step cannot be applied. Called for every
        step before anything is applied, so a bad step never leaves a half-modified pipeline."""

    def touches(self, available: list[str]) -> set[str]:
        """Components whose placement or weights this step changes (for conflict checks)."""
        explicit = getattr(self, "components", None)
        if not self.pipeline_wide:
            return {c for c in self.target_components(available) if c is not None}
        if explicit is not None:
            return set(explicit)
        return set() if self.yields_to_placed else set(available)

    def target_components(self, available: list[str]) -> list[str | None]:
        """The components this config applies to, given the pipeline's model components."""
        if self.pipeline_wide:
            return [None]
        requested = getattr(self, "components", None)
        if requested is None:
            return [c for c in self.default_components if c in available]
        if isinstance(requested, str):
            requested = (requested,)
        unknown = [c for c in requested if c not in available]
        if unknown:
            raise InvalidRequestError(
                f"{self.name}: unknown component(s) {unknown}; this pipeline has {sorted(available)}. "
                "Pass one of those names in components=..."
            )
        return list(requested)

    def step_lossless(self, pipe: Any, component: str | None) -> bool:
        return self.lossless

    def step_reversible(self, pipe: Any, component: str | None) -> bool:
        return self.reversible

    def default_reason(self, component: str | None) -> str:
        return "requested by the caller"

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._fields().items() if v is not None)
        return f"{self.name}({args})"

    def _fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.name}
        for key, value in self._fields().items():
            if isinstance(value, torch.dtype):
                value = dtype_name(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out


T = TypeVar("T", bound=type[Strategy])


def register_strategy(config_type: type[Strategy]) -> Callable[[ApplyFn], ApplyFn]:
    """Register the function that applies ``config_type`` to a pipeline."""

    def decorator(fn: ApplyFn) -> ApplyFn:
        if config_type in _REGISTRY:
            raise VramkitError(f"A function is already registered for {config_type.__name__}.")
        _REGISTRY[config_type] = fn
        _BY_NAME[config_type.name] = config_type
        return fn

    return decorator


def get_apply_fn(config: Strategy) -> ApplyFn:
    try:
        return _REGISTRY[type(config)]
    except KeyError:
        raise VramkitError(
            f"No apply function is registered for {type(config).__name__}; "
            "register one with @vramkit.strategies.register_strategy."
        ) from None


def strategy_types() -> dict[str, type[Strategy]]:
    """Every registered strategy config type, by name."""
    return dict(_BY_NAME)


def strategy_from_dict(data: dict[str, Any]) -> Strategy:
    data = dict(data)
    name = data.pop("type")
    cls = _BY_NAME.get(name)
    if cls is None:
        raise InvalidRequestError(f"Unknown strategy {name!r}; known: {sorted(_BY_NAME)}.")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            if isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
    return cls(**kwargs)
