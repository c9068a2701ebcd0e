"""Per-pipeline vramkit state, kept on the pipeline object itself (no global registry).

vramkit also needs to run code around each pipeline call (offload everything after a call,
recovery, profiling). Python looks ``__call__`` up on the type, so the pipeline's class is swapped
for a same-named subclass whose ``__call__`` runs the registered call hooks; ``restore`` swaps the
original class back."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Protocol

STATE_ATTR = "_vramkit_state"


class CallHook(Protocol):
    def before_call(self, pipe: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None: ...

    def after_call(self, pipe: Any) -> None: ...


@dataclass
class PipelineState:
    plan: Any  # vramkit.plan.Plan (typed loosely to avoid an import cycle)
    applied: list[tuple[Any, Any]] = field(default_factory=list)  # (PlanStep, undo or None)
    call_hooks: dict[str, CallHook] = field(default_factory=dict)
    placed: dict[str, str] = field(default_factory=dict)  # component -> strategy that placed it
    original_class: type | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    recovery_remove: Any = None  # removes the recovery guards (vramkit.recovery)
    # component -> torch.device it was bound to by a step with an explicit ``device=`` (Resident,
    # BlockStreaming): its inputs and outputs cross devices through a vramkit_device hook.
    devices: dict[str, Any] = field(default_factory=dict)

    def execution_device(self) -> Any:
        """Where the pipeline should create latents and send inputs: the transformer's device when a
        step bound it to one (several GPUs), else ``None`` (diffusers decides, as without vramkit)."""
        return self.devices.get("transformer")

    def _refuse_copy(self) -> None:
        from .errors import VramkitError

        raise VramkitError(
            "An optimized pipeline cannot be copied or pickled: its undo functions belong to this one "
            "object. Call vramkit.restore(pipe) first, copy, then optimize each copy."
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> PipelineState:
        self._refuse_copy()
        raise AssertionError  # unreachable

    def __reduce__(self) -> Any:
        self._refuse_copy()


def get_state(pipe: Any) -> PipelineState | None:
    return pipe.__dict__.get(STATE_ATTR)


def set_state(pipe: Any, state: PipelineState | None) -> None:
    if state is None:
        pipe.__dict__.pop(STATE_ATTR, None)
    else:
        pipe.__dict__[STATE_ATTR] = state


@functools.cache
def _wrapped_class(cls: type) -> type:
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = get_state(self)
        hooks = list(state.call_hooks.values()) if state is not None else []
        for hook in hooks:
            hook.before_call(self, args, kwargs)
        try:
            return cls.__call__(self, *args, **kwargs)
        finally:
            # A recovery may have swapped plans mid-call: offload with the hooks registered now.
            current = get_state(self)
            for hook in reversed(list(current.call_hooks.values()) if current is not None else []):
                hook.after_call(self)

    def _execution_device(self: Any) -> Any:
        # diffusers answers with the first component in its signature (the VAE for Flux), which is
        # wrong once the VAE lives on another GPU than the transformer: latents, prompt embeddings
        # and the per-step inputs must be created where the transformer runs.
        state = get_state(self)
        device = state.execution_device() if state is not None else None
        return device if device is not None else super(wrapped, self)._execution_device

    __call__.__doc__ = cls.__call__.__doc__
    namespace: dict[str, Any] = {
        "__call__": __call__,
        "_execution_device": property(_execution_device),
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "_vramkit_wrapped": True,
    }
    # While vramkit owns the pipeline, diffusers' LoRA methods go through vramkit.lora, which takes
    # offloading off while adapters change and puts it back after.
    from .lora import pipeline_method_overrides

    namespace.update(pipeline_method_overrides(cls))
    wrapped = type(cls.__name__, (cls,), namespace)
    return wrapped


def install_call_wrapper(pipe: Any, state: PipelineState) -> None:
    cls = type(pipe)
    if getattr(cls, "_vramkit_wrapped", False):
        return
    state.original_class = cls
    pipe.__class__ = _wrapped_class(cls)


def remove_call_wrapper(pipe: Any, state: PipelineState) -> None:
    if state.original_class is not None:
        pipe.__class__ = state.original_class
        state.original_class = None
