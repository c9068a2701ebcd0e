"""The public strategy configs. Each is a small frozen dataclass; its mechanism lives in the module
of the same topic (``precision.py``, ``offload.py``, ...) and is registered for the config type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import InvalidRequestError
from .base import Strategy, dtype_name, parse_dtype

__all__ = [
    "Precision",
    "StoreFP8",
    "Quantize",
    "ModelOffload",
    "SequentialOffload",
    "AttentionSlicing",
    "AttentionBackend",
    "VaeTiling",
    "VaeSlicing",
    "PromptCache",
    "GradientCheckpointing",
    "Resident",
    "Compile",
]

ALL_MODELS = ("text_encoder", "text_encoder_2", "transformer", "controlnet", "vae", "image_encoder")
_OFFLOADS = frozenset({"ModelOffload", "SequentialOffload", "BlockStreaming"})


def _components(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    if not value or not all(isinstance(c, str) and c for c in value):
        raise InvalidRequestError(f"components must be a non-empty list of component names, got {value!r}.")
    if len(set(value)) != len(value):
        raise InvalidRequestError(f"components lists a name twice: {value!r}.")
    return value


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _device_name(owner: str, value: Any) -> str | None:
    """A ``device=`` argument as a string (``torch.device`` and ints accepted, so plans stay JSON)."""
    if value is None:
        return None
    import torch

    if isinstance(value, bool):
        raise InvalidRequestError(f"{owner}(device={value!r}): give a device such as 'cuda:1'.")
    try:
        dev = torch.device(f"cuda:{value}" if isinstance(value, int) else value)
    except (RuntimeError, TypeError) as exc:
        raise InvalidRequestError(f"{owner}(device={value!r}): not a device ({exc}); e.g. 'cuda:1'.") from None
    return str(dev)


@dataclass(frozen=True)
class Precision(Strategy):
    """Cast components to bf16, fp16 or fp32. fp16 leaves T5 (``text_encoder_2``) alone unless
    ``force=True``: T5 overflows in fp16. Lossless (and reversible) only when no bits are lost."""

    dtype: str = "bf16"
    components: tuple[str, ...] | None = None
    force: bool = False

    name: ClassVar[str] = "Precision"
    order: ClassVar[int] = 10
    default_components: ClassVar[tuple[str, ...]] = ALL_MODELS

    def __post_init__(self) -> None:
        _set(self, "dtype", dtype_name(parse_dtype(self.dtype)))
        _set(self, "components", _components(self.components))

    def target_components(self, available: list[str]) -> list[str | None]:
        targets = super().target_components(available)
        if self.dtype == "fp16" and not self.force and self.components is None:
            targets = [c for c in targets if c != "text_encoder_2"]
        elif self.dtype == "fp16" and not self.force and "text_encoder_2" in targets:
            raise InvalidRequestError(
                "Precision('fp16') on text_encoder_2: T5 overflows in fp16 and yields NaN embeddings. "
                "Keep it in bf16/fp32, or pass force=True if you know your T5 checkpoint is fp16-safe."
            )
        return targets

    def step_lossless(self, pipe: Any, component: str | None) -> bool:
        from .precision import cast_is_exact

        return cast_is_exact(getattr(pipe, component), parse_dtype(self.dtype))

    def step_reversible(self, pipe: Any, component: str | None) -> bool:
        return self.step_lossless(pipe, component)


@dataclass(frozen=True)
class StoreFP8(Strategy):
    """Store weights as float8_e4m3fn and compute in the component's dtype (layerwise casting);
    norms, embeddings and the input/output projections stay in full precision. Halves weight memory,
    changes numerics, cannot be undone (the dropped bits are gone)."""

    components: tuple[str, ...] | None = None

    name: ClassVar[str] = "StoreFP8"
    lossless: ClassVar[bool] = False
    reversible: ClassVar[bool] = False
    conflicts_with: ClassVar[frozenset[str]] = frozenset({"Quantize", "SequentialOffload"})
    order: ClassVar[int] = 25

    def __post_init__(self) -> None:
        _set(self, "components", _components(self.components))


QUANT_WEIGHTS = ("int8", "nf4", "fp8")
QUANT_BACKENDS = ("bitsandbytes", "quanto", "torchao")


@dataclass(frozen=True)
class Quantize(Strategy):
    """Quantize the weights of an already loaded component in place, block by block (peak memory
    does not double). ``weights``: int8, nf4 or fp8; ``backend``: bitsandbytes, quanto or torchao."""

    weights: str = "int8"
    backend: str = "torchao"
    components: tuple[str, ...] | None = None

    name: ClassVar[str] = "Quantize"
    lossless: ClassVar[bool] = False
    reversible: ClassVar[bool] = False
    conflicts_with: ClassVar[frozenset[str]] = frozenset({"StoreFP8", "SequentialOffload", "BlockStreaming"})
    order: ClassVar[int] = 20

    def __post_init__(self) -> None:
        if self.weights not in QUANT_WEIGHTS:
            raise InvalidRequestError(f"Quantize(weights={self.weights!r}): use one of {QUANT_WEIGHTS}.")
        if self.backend not in QUANT_BACKENDS:
            raise InvalidRequestError(f"Quantize(backend={self.backend!r}): use one of {QUANT_BACKENDS}.")
        if (self.weights, self.backend) in {("nf4", "torchao"), ("nf4", "quanto")}:
            raise InvalidRequestError(
                f"Quantize(weights='nf4', backend={self.backend!r}) is not supported: nf4 needs "
                "backend='bitsandbytes' (or use weights='int8' with this backend)."
            )
        _set(self, "components", _components(self.components))

    def check(self, pipe: Any, component: str | None) -> None:
        from .quantize import _require

        _require(self.backend)


@dataclass(frozen=True)
class ModelOffload(Strategy):
    """Keep whole components in host RAM and move each to the GPU when it runs (back after).
    ``components`` limits which ones (default: every model component not placed by another step)."""

    device: str | None = None
    components: tuple[str, ...] | None = None

    name: ClassVar[str] = "ModelOffload"
    conflicts_with: ClassVar[frozenset[str]] = _OFFLOADS
    yields_to_placed: ClassVar[bool] = True
    order: ClassVar[int] = 80
    pipeline_wide: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _set(self, "components", _components(self.components))


@dataclass(frozen=True)
class SequentialOffload(Strategy):
    """Leaf-level offload: every layer's weights move to the GPU just before it runs. Least VRAM,
    slowest (every weight crosses the bus every step)."""

    device: str | None = None

    name: ClassVar[str] = "SequentialOffload"
    conflicts_with: ClassVar[frozenset[str]] = _OFFLOADS | {"StoreFP8", "Quantize", "PromptCache"}
    order: ClassVar[int] = 90
    pipeline_wide: ClassVar[bool] = True


@dataclass(frozen=True)
class AttentionSlicing(Strategy):
    """Compute attention ``chunk`` queries at a time (real slicing for Flux, where diffusers'
    ``enable_attention_slicing`` does nothing). Same output, smaller attention peak."""

    chunk: int = 1024
    components: tuple[str, ...] | None = None

    name: ClassVar[str] = "AttentionSlicing"
    order: ClassVar[int] = 41
    default_components: ClassVar[tuple[str, ...]] = ("transformer", "controlnet")

    def step_lossless(self, pipe: Any, component: str | None) -> bool:
        # Each query row attends to all keys either way, but a chunk that is not a multiple of the
        # kernels' row tiles changes the GEMM micro-kernels and the last bits (measured on CPU:
        # chunks that are multiples of 16 were bit-identical, chunk 3 was not).
        return self.chunk % 64 == 0

    def __post_init__(self) -> None:
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise InvalidRequestError(f"AttentionSlicing(chunk={self.chunk!r}): chunk must be a positive int.")
        _set(self, "components", _components(self.components))


@dataclass(frozen=True)
class AttentionBackend(Strategy):
    """Select a diffusers attention backend (``"native"``, ``"flash"``, ``"_native_math"``, ...)."""

    backend: str = "native"
    components: tuple[str, ...] | None = None

    name: ClassVar[str] = "AttentionBackend"
    order: ClassVar[int] = 40
    default_components: ClassVar[tuple[str, ...]] = ("transformer", "controlnet")

    def step_lossless(self, pipe: Any, component: str | None) -> bool:
        # Another kernel sums in another order: only the default backend is bit-identical.
        return self.backend == "native"

    def __post_init__(self) -> None:
        _set(self, "components", _components(self.components))


@dataclass(frozen=True)
class VaeTiling(Strategy):
    """Decode (and encode) in ``tile`` x ``tile`` pixel tiles with blended seams. Set explicitly: a
    VAE config's ``sample_size`` is often tiny and makes decoding 100x slower. Changes numerics
    near seams for images larger than one tile."""

    tile: int = 512
    overlap: float = 0.25

    name: ClassVar[str] = "VaeTiling"
    lossless: ClassVar[bool] = False
    order: ClassVar[int] = 51
    default_components: ClassVar[tuple[str, ...]] = ("vae",)

    def __post_init__(self) -> None:
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 64 or self.tile % 8:
            raise InvalidRequestError(
                f"VaeTiling(tile={self.tile!r}): tile must be an int >= 64 and a multiple of 8 (e.g. 512)."
            )
        if not (0.0 <= float(self.overlap) < 0.5):
            raise InvalidRequestError(f"VaeTiling(overlap={self.overlap!r}): overlap must be in [0, 0.5).")


@dataclass(frozen=True)
class VaeSlicing(Strategy):
    """Decode a batch one image at a time."""

    name: ClassVar[str] = "VaeSlicing"
    order: ClassVar[int] = 50
    default_components: ClassVar[tuple[str, ...]] = ("vae",)


PROMPT_RELEASE = ("cpu", "delete")


@dataclass(frozen=True)
class PromptCache(Strategy):
    """Encode each prompt once, keep the embeddings, and release the text encoders: ``"cpu"`` moves
    them to host RAM (a new prompt brings them back), ``"delete"`` drops them (irreversible; a new
    prompt is then an error)."""

    release: str = "cpu"
    max_entries: int = 32

    name: ClassVar[str] = "PromptCache"
    order: ClassVar[int] = 75  # after Resident/BlockStreaming (yield to them), before ModelOffload
    pipeline_wide: ClassVar[bool] = True
    yields_to_placed: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.release not in PROMPT_RELEASE:
            raise InvalidRequestError(f"PromptCache(release={self.release!r}): use one of {PROMPT_RELEASE}.")
        if isinstance(self.max_entries, bool) or not isinstance(self.max_entries, int) or self.max_entries < 1:
            raise InvalidRequestError("PromptCache(max_entries=...): must be a positive int.")

    def step_reversible(self, pipe: Any, component: str | None) -> bool:
        return self.release == "cpu"

    def default_reason(self, component: str | None) -> str:
        return "prompt embeddings are computed once and reused; the text encoders leave the GPU"


@dataclass(frozen=True)
class GradientCheckpointing(Strategy):
    """Recompute activations in the backward pass (training, e.g. LoRA fine-tuning). Refused on a
    component in eval mode: it saves nothing at inference."""

    components: tuple[str, ...] | None = None

    name: ClassVar[str] = "GradientCheckpointing"
    order: ClassVar[int] = 30

    def __post_init__(self) -> None:
        _set(self, "components", _components(self.components))

    def check(self, pipe: Any, component: str | None) -> None:
        if not getattr(pipe, component).training:
            raise InvalidRequestError(
                f"GradientCheckpointing on {component}: the module is in eval mode, where checkpointing "
                "saves nothing (no backward pass). Call .train() first when fine-tuning."
            )


@dataclass(frozen=True)
class Resident(Strategy):
    """Keep whole components on the GPU for the entire call (the fastest place for a component
    that fits). ``device`` defaults to the current CUDA device (the CPU on a machine without one).

    With an explicit ``device`` the component may live on another GPU than the transformer: its
    inputs move to its device and its outputs back, and a transformer given a device becomes the
    pipeline's execution device (``Resident(("text_encoder", "text_encoder_2", "vae"), device="cuda:1")``
    beside ``Resident(("transformer",), device="cuda:0")``)."""

    components: tuple[str, ...] | None = None
    device: str | None = None

    name: ClassVar[str] = "Resident"
    order: ClassVar[int] = 65
    conflicts_with: ClassVar[frozenset[str]] = _OFFLOADS
    default_components: ClassVar[tuple[str, ...]] = ("transformer",)

    def __post_init__(self) -> None:
        _set(self, "components", _components(self.components))
        _set(self, "device", _device_name(self.name, self.device))

    def default_reason(self, component: str | None) -> str:
        return "fits on the GPU: no transfer at all during the call"


COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class Compile(Strategy):
    """``torch.compile`` of the component's repeated blocks only (regional compilation, as diffusers'
    ``compile_repeated_blocks``): every block shares one compiled graph, so compiling takes seconds
    and later steps do not recompile. Modes with CUDA graphs (``reduce-overhead``, ``max-autotune``)
    are refused on components whose weights move (streamed or offloaded): a graph replays fixed
    addresses. ``backend="inductor"`` fuses kernels, which can change the last bits."""

    mode: str | None = None
    backend: str = "inductor"
    dynamic: bool | None = None
    components: tuple[str, ...] | None = None

    name: ClassVar[str] = "Compile"
    order: ClassVar[int] = 95
    default_components: ClassVar[tuple[str, ...]] = ("transformer", "controlnet")

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise InvalidRequestError(f"Compile(mode={self.mode!r}): use one of {COMPILE_MODES}.")
        if not isinstance(self.backend, str) or not self.backend:
            raise InvalidRequestError(f"Compile(backend={self.backend!r}): give a torch.compile backend name.")
        _set(self, "components", _components(self.components))

    def step_lossless(self, pipe: Any, component: str | None) -> bool:
        return self.backend in ("eager", "aot_eager")

    def default_reason(self, component: str | None) -> str:
        return "compiled repeated blocks run faster; one graph serves every block, so steps do not recompile"
