"""Adding ``torch.compile`` to a plan (``compile=True``): which components compile, in which mode.

Pure: reads a finished plan and returns it with a :class:`~vramkit.strategies.Compile` step and
the reason for its mode. Regional compilation (one graph per repeated block class) fits every
placement that keeps whole blocks on the GPU while they run: resident, block-streamed and
model-offloaded components. The mode is torch's default in all of them:

- streamed and offloaded weights move (ring slots, offload per call), and CUDA-graph modes
  (``reduce-overhead``, ``max-autotune``) replay fixed addresses: they do not fit;
- resident weights stay put, but CUDA graphs keep a private memory pool per graph that the plan's
  memory model does not count, so they could break the budget the plan was fitted to.

Sequential offload is left uncompiled: its weights arrive layer by layer under accelerate's hooks.
The predicted times do not count compile's speed-up (measured on an H200, 8 GiB, 1024²: 1.25x
per step for an fp8-stored streamed transformer, whose step waits for compute; 0.99x for bf16,
whose step waits for the copies: ``benchmarks/results/compile_1024_*_h200.json``).
"""

from __future__ import annotations

import dataclasses

from ..errors import InvalidRequestError
from ..plan import Plan, PlanStep
from ..strategies.configs import Compile

__all__ = ["check_compile_quality", "with_compile"]

_COMPILABLE = ("transformer", "controlnet")
_MOVES = {"BlockStreaming": "block-streamed", "ModelOffload": "offloaded per call"}


def check_compile_quality(quality: str) -> None:
    """Refuse ``compile=True`` with ``quality="lossless"`` (called before any search)."""
    if quality == "lossless":
        raise InvalidRequestError(
            "compile=True with quality='lossless': torch.compile (inductor) fuses kernels and changes the last "
            "bits, so the output would not be bit-identical. Use quality='auto' to compile, or leave compile off."
        )


def _placement(plan: Plan, component: str) -> str | None:
    """How ``component`` is placed by ``plan``: a strategy name, or ``None`` when no step names it."""
    for step in plan.steps:
        s = step.strategy
        if s.name == "SequentialOffload":
            return "SequentialOffload"
        names = getattr(s, "components", None) or ()
        if step.component == component or component in names:
            if s.name in ("BlockStreaming", "ModelOffload", "Resident"):
                return s.name
    return None


def with_compile(plan: Plan, quality: str, components: tuple[str, ...] = _COMPILABLE) -> Plan:
    """``plan`` with a ``Compile`` step for the transformer (and ControlNet) and why its mode fits.

    ``components``: the compilable components the pipeline has (default: transformer and
    ControlNet); each is compiled unless sequentially offloaded. Raises
    :class:`InvalidRequestError` with ``quality="lossless"``: inductor's fused kernels change the
    last bits, so a compiled plan is never bit-identical.
    """
    check_compile_quality(quality)
    if not plan.steps and plan.predicted is None:
        return dataclasses.replace(plan, notes=[*plan.notes, "compile: no GPU plan, nothing compiled"])
    notes = list(plan.notes)
    chosen: list[str] = []
    why: list[str] = []
    for component in components:
        placed = _placement(plan, component)
        if placed is None and component != "transformer":
            continue  # no ControlNet in this pipeline
        if placed == "SequentialOffload":
            notes.append(
                f"compile: {component} is not compiled: sequential offload moves its weights layer by layer "
                "under accelerate's hooks"
            )
            continue
        chosen.append(component)
        if placed in _MOVES:
            why.append(
                f"{component} is {_MOVES[placed]}: its weights move, so CUDA-graph modes (reduce-overhead, "
                "max-autotune) do not fit"
            )
        else:
            why.append(
                f"{component} is resident: CUDA-graph modes would fit its weights, but their memory pools are "
                "not in the plan's memory model"
            )
    if not chosen:
        return dataclasses.replace(plan, notes=notes)
    config = Compile(mode=None, components=tuple(chosen))
    reason = (
        "torch's default mode: "
        + "; ".join(why)
        + ". One graph per repeated block class, compiled at the first call (seconds to a minute), no "
        "recompilation later; faster where the step waits for compute (measured 1.25x per step with fp8 "
        "storage at 8 GiB on an H200), not where it waits for copies (0.99x, bf16 at 8 GiB); the predicted "
        "times leave this out; a recovery re-plan compiles again; changes the last bits"
    )
    added = [PlanStep(strategy=config, component=c, reason=reason, lossless=False, reversible=True) for c in chosen]
    steps = sorted([*plan.steps, *added], key=lambda st: st.strategy.order)
    return dataclasses.replace(plan, steps=steps, notes=notes)
