"""Recovery from out-of-memory errors during a pipeline call.

For the duration of each pipeline call, every model component's class is swapped for a
same-named subclass whose ``__call__`` (and
``encode``/``decode`` for the VAE) catches an out-of-memory error, frees what it can, re-plans for
the memory free now, swaps the new plan in, and calls the same component again with the same
inputs. The pipeline's own state (prompt embeddings, latents of the steps already done) lives in
its ``__call__`` and is kept: the call continues from the stage that failed, and the result equals
an uninterrupted run of the new plan. Forward hooks of other strategies (accelerate, diffusers)
patch ``forward`` on the instance and are not touched by this class swap.
"""

from __future__ import annotations

import functools
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _pipeline
from .errors import OutOfMemoryError, PlanInfeasibleError

logger = logging.getLogger("vramkit")

RECOVERY_ATTR = "_vramkit_recovery"
_STAGE = {"forward": None, "decode": "vae_decode", "encode": "vae_encode"}
_FORWARD_STAGE = {
    "text_encoder": "text_encoding",
    "text_encoder_2": "text_encoding",
    "image_encoder": "image_encoding",
    "transformer": "denoising_step",
    "controlnet": "denoising_step",
    "vae": "vae_decode",
}


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's ``torch.OutOfMemoryError`` and the plain RuntimeErrors other backends raise."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if oom_type and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@dataclass
class RecoveryController:
    """Owns the retry policy of one pipeline: at most ``max_retries`` recoveries per pipeline call,
    each planning for a smaller share of what is free (``shrink`` per attempt)."""

    pipe: Any
    replan: Callable[[int | None], Any]  # budget in bytes (None: probe) -> Plan
    swap_plan: Callable[[Any], Any]  # Plan -> applied Plan
    budget: int | None = None
    max_retries: int = 3
    shrink: float = 0.8
    events: list[dict[str, Any]] = field(default_factory=list)
    attempts_this_call: int = 0
    depth: int = 0
    #: installs the component guards and returns their remover (set by vramkit.api)
    install_guards: Callable[[], Callable[[], None]] | None = None
    _remove_guards: Callable[[], None] | None = None

    # Call hook protocol (vramkit._state). The guards exist only during a pipeline call, so outside
    # one every component has its own class (diffusers' from_pipe, pickling, torch.save work).
    def before_call(self, pipe: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.attempts_this_call = 0
        if self._remove_guards is None and self.install_guards is not None:
            self._remove_guards = self.install_guards()

    def after_call(self, pipe: Any) -> None:
        self.remove_guards()

    def remove_guards(self) -> None:
        if self._remove_guards is not None:
            self._remove_guards()
            self._remove_guards = None

    def _free_now(self) -> int | None:
        """Memory a new plan can use: free on the device plus what the pipeline holds there now (the
        swap releases the old plan's weights and buffers before the new one places its own).
        Without this, a pipeline holding most of the card would re-plan for the sliver left."""
        if not torch.cuda.is_available():
            return None
        # The device the pipeline computes on (not necessarily the current one).
        dev = getattr(self.pipe, "_execution_device", None)
        index = dev.index if isinstance(dev, torch.device) and dev.type == "cuda" and dev.index is not None else None
        if index is None:
            index = torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        from .api import applied_plan

        plan = applied_plan(self.pipe)
        request = getattr(plan, "request", None) or {}
        outside = request.get("vram_outside_pipeline")
        if isinstance(outside, (int, float)):
            held = max(0, torch.cuda.memory_allocated(index) - int(outside))
            return int(free) + held
        return int(free)

    def recover(self, component: str, method: str, error: str) -> None:
        stage = _STAGE.get(method) or _FORWARD_STAGE.get(component, component)
        self.attempts_this_call += 1
        from .api import applied_plan

        old = applied_plan(self.pipe)
        old_desc = [f"{s.strategy.describe()}@{s.component or 'pipeline'}" for s in old.steps] if old else []
        if self.attempts_this_call > self.max_retries:
            raise OutOfMemoryError(
                f"Out of GPU memory in {stage} ({component}) after {self.max_retries} recoveries; "
                f"last error: {error}. Free GPU memory (other processes, cached tensors) or plan for a "
                "smaller request.",
                stage=stage,
            )
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        free = self._free_now()
        candidates = [b for b in (free, self.budget) if b is not None]
        budget = int(min(candidates) * self.shrink**self.attempts_this_call) if candidates else None
        try:
            new_plan = self.replan(budget)
        except PlanInfeasibleError as exc:
            raise OutOfMemoryError(
                f"Out of GPU memory in {stage} ({component}), and no plan fits the {budget} bytes left: "
                f"{exc}",
                minimum_vram=exc.minimum_vram,
                stage=stage,
            ) from None
        applied = self.swap_plan(new_plan)
        self.budget = budget if budget is not None else self.budget
        new_desc = [f"{s.strategy.describe()}@{s.component or 'pipeline'}" for s in applied.steps]
        event = {
            "event": "recovered_out_of_memory",
            "stage": stage,
            "component": component,
            "attempt": self.attempts_this_call,
            "budget": budget,
            "error": error,
            "old_plan": old_desc,
            "new_plan": new_desc,
        }
        self.events.append(event)
        logger.warning(
            "vramkit recovered from out of memory in %s (%s), attempt %d: old plan %s, new plan %s (budget %s)",
            stage, component, self.attempts_this_call, old_desc, new_desc, budget,
        )


def _guarded(module: Any, component: str, method: str, call: Callable[[], Any]) -> Any:
    controller: RecoveryController | None = module.__dict__.get(RECOVERY_ATTR)
    if controller is None or controller.depth > 0:
        return call()
    controller.depth += 1
    try:
        while True:
            error: str | None = None
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled
                if not is_out_of_memory(exc):
                    raise
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            # Outside the except block, so the traceback (and the tensors its frames hold) is gone.
            controller.recover(component, method, error)
    finally:
        controller.depth -= 1


@functools.cache
def _recovering_class(cls: type) -> type:
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _guarded(self, self.__dict__.get("_vramkit_component", "?"), "forward",
                        lambda: cls.__call__(self, *args, **kwargs))

    namespace: dict[str, Any] = {
        "__call__": __call__,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "_vramkit_recovering": True,
    }
    for name in ("encode", "decode"):
        original = getattr(cls, name, None)
        if original is None:
            continue

        def method(self: Any, *args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            return _guarded(self, self.__dict__.get("_vramkit_component", "?"), _name,
                            lambda: _original(self, *args, **kwargs))

        functools.update_wrapper(method, original)
        namespace[name] = method
    return type(cls.__name__, (cls,), namespace)


def install_recovery(pipe: Any, controller: RecoveryController) -> Callable[[], None]:
    """Guard every model component; returns the function that removes the guards."""
    swapped: list[tuple[torch.nn.Module, type]] = []
    for name, module in _pipeline.model_components(pipe).items():
        cls = type(module)
        if getattr(cls, "_vramkit_recovering", False):
            continue
        module.__class__ = _recovering_class(cls)
        module.__dict__[RECOVERY_ATTR] = controller
        module.__dict__["_vramkit_component"] = name
        swapped.append((module, cls))

    def remove() -> None:
        for module, cls in swapped:
            module.__class__ = cls
            module.__dict__.pop(RECOVERY_ATTR, None)
            module.__dict__.pop("_vramkit_component", None)

    return remove
