"""The public entry points: ``optimize``, ``plan`` and ``restore``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import _pipeline
from ._pipeline import model_components
from ._state import PipelineState, get_state, install_call_wrapper, remove_call_wrapper, set_state
from .errors import IrreversibleError, StrategyConflictError, VramkitError
from .memory.probe import vram_outside
from .plan import Plan, PlanStep
from .strategies import Strategy, get_apply_fn

logger = logging.getLogger("vramkit")

__all__ = ["optimize", "plan", "restore", "plan_from_strategies", "applied_plan"]


def plan_from_strategies(pipe: Any, strategies: Sequence[Strategy]) -> Plan:
    """Expand hand-picked strategies into ordered, checked steps (nothing is applied)."""
    _pipeline.check_flux_pipeline(pipe)
    available = list(_pipeline.model_components(pipe))
    strategies = list(strategies)
    for s in strategies:
        if not isinstance(s, Strategy):
            raise StrategyConflictError(
                f"strategies must be vramkit.strategies configs, got {type(s).__name__}: "
                "e.g. strategies=[vramkit.strategies.VaeTiling(tile=512)]."
            )
    indexed = sorted(enumerate(strategies), key=lambda item: (item[1].order, item[0]))
    steps: list[PlanStep] = []
    for _, s in indexed:
        for component in s.target_components(available):
            steps.append(
                PlanStep(
                    strategy=s,
                    component=component,
                    reason=s.default_reason(component),
                    lossless=s.step_lossless(pipe, component),
                    reversible=s.step_reversible(pipe, component),
                )
            )
    if not steps:
        names = ", ".join(s.describe() for s in strategies)
        if strategies:
            logger.info("No step applies to this pipeline for: %s", names)
    state = get_state(pipe)
    leftovers = [step for step, _ in state.applied] if state is not None else []
    _check_conflicts(leftovers + steps, available, n_existing=len(leftovers))
    return Plan(steps=steps)


def _per_component(pipe: Any, the_plan: Plan) -> Plan:
    """Expand planner steps that name several components in one config into one step per
    component (how they are applied and undone), and check them for conflicts."""
    available = list(_pipeline.model_components(pipe))
    steps: list[PlanStep] = []
    for step in the_plan.steps:
        if step.component is not None or step.strategy.pipeline_wide:
            steps.append(step)
            continue
        for component in step.strategy.target_components(available):
            strategy = step.strategy
            if len(getattr(strategy, "components", None) or ()) > 1:
                # One config per component: each step then says exactly what it does.
                strategy = dataclasses.replace(strategy, components=(component,))
            steps.append(
                PlanStep(
                    strategy=strategy,
                    component=component,
                    reason=step.reason,
                    lossless=step.strategy.step_lossless(pipe, component) and step.lossless,
                    reversible=step.strategy.step_reversible(pipe, component) and step.reversible,
                )
            )
    _check_conflicts(steps, available)
    the_plan.steps = steps
    return the_plan


def _check_conflicts(steps: list[PlanStep], available: list[str], n_existing: int = 0) -> None:
    for i, a in enumerate(steps):
        for j in range(i + 1, len(steps)):
            if j < n_existing:
                continue
            b = steps[j]
            where_a = a.strategy.touches(available) if a.component is None else {a.component}
            where_b = b.strategy.touches(available) if b.component is None else {b.component}
            if a.strategy.name == b.strategy.name and (a.component == b.component or where_a & where_b):
                already = " (applied earlier by vramkit)" if i < n_existing else ""
                raise StrategyConflictError(
                    f"{a.strategy.name} is applied twice to {a.component or 'the pipeline'}{already}. "
                    "Give each strategy once; to change it, call vramkit.restore(pipe) first."
                )
            conflicting = b.strategy.name in a.strategy.conflicts_with or a.strategy.name in b.strategy.conflicts_with
            both_wide = (a.strategy.pipeline_wide and b.strategy.pipeline_wide
                         and a.component is None and b.component is None)
            if conflicting and (both_wide or where_a & where_b):
                shared = sorted(where_a & where_b) or ["the pipeline"]
                raise StrategyConflictError(
                    f"{a.strategy.describe()} and {b.strategy.describe()} conflict on {', '.join(shared)}: "
                    "each decides where those weights live. Keep one of them (or give them disjoint components=)."
                )


def applied_plan(pipe: Any) -> Plan | None:
    """The plan vramkit applied to ``pipe``, or ``None``."""
    state = get_state(pipe)
    return state.plan if state is not None else None


def _apply(pipe: Any, plan: Plan) -> Plan:
    # Every check first: a step that cannot be applied must fail before anything changed.
    for step in plan.steps:
        step.strategy.check(pipe, step.component)
    state = get_state(pipe)
    fresh = state is None
    if fresh and plan.request:
        # What this process already holds on the device outside the pipeline (other models, a
        # ballast): not the plan's, so the profiler leaves it out when it compares with predictions.
        outside = vram_outside(model_components(pipe).values(), plan.request.get("device"))
        if outside is not None:
            plan = dataclasses.replace(plan, request={**plan.request, "vram_outside_pipeline": outside})
    if state is None:
        state = PipelineState(plan=plan)
        set_state(pipe, state)
    applied: list[tuple[PlanStep, Any]] = []
    try:
        for step in plan.steps:
            undo = get_apply_fn(step.strategy)(pipe, step.strategy, step.component)
            applied.append((step, undo))
            logger.info("applied %s on %s: %s", step.strategy.describe(), step.component or "pipeline", step.reason)
        install_call_wrapper(pipe, state)
    except BaseException as exc:
        irreversible = _undo_all(pipe, applied)
        state.applied.extend((s, None) for s in irreversible)
        if fresh and not state.applied:
            remove_call_wrapper(pipe, state)
            set_state(pipe, None)
        else:
            state.plan = Plan(steps=[s for s, _ in state.applied])
            pipe.__dict__["vramkit_plan"] = state.plan
        if isinstance(exc, VramkitError) or not isinstance(exc, Exception):
            raise
        raise VramkitError(
            f"Applying {step.strategy.describe()} to {step.component or 'the pipeline'} failed: {exc}. "
            "Every step applied before it was undone."
        ) from exc
    state.applied.extend(applied)
    if not fresh:
        plan = Plan(
            steps=[s for s, _ in state.applied],
            predicted=plan.predicted,
            rejected=plan.rejected,
            request=plan.request,
            notes=plan.notes,
        )
    state.plan = plan
    pipe.__dict__["vramkit_plan"] = plan
    return plan


def _undo_all(pipe: Any, applied: list[tuple[PlanStep, Any]]) -> list[PlanStep]:
    """Undo steps in reverse order; return the steps that could not be undone."""
    irreversible: list[PlanStep] = []
    frozen: set[str] = set()  # components a later irreversible step changed
    for step, undo in reversed(applied):
        if undo is None or (step.component is not None and step.component in frozen):
            irreversible.append(step)
            if step.component is not None:
                frozen.add(step.component)
            continue
        undo()
    return list(reversed(irreversible))


def optimize(
    pipe: Any,
    *,
    strategies: Sequence[Strategy] | None = None,
    vram: int | str | Mapping[Any, int | str] | None = None,
    ram: int | str | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    max_sequence_length: int | None = None,
    quality: str = "auto",
    device: str | None = None,
    recover: bool = True,
    **planner_kwargs: Any,
) -> Plan:
    """Plan (or take the given ``strategies``) and apply them to ``pipe``; return the applied Plan.

    With ``strategies``, exactly those are applied, in a safe order. Without, the planner picks the
    fastest plan that fits ``vram``/``ram`` (default: what is free now) for the request
    (``height``, ``width``, ``batch_size``, ...). Undo with :func:`vramkit.restore`.
    On any failure, whatever was applied is undone before the error is raised.

    With ``recover=True`` (the default) every later pipeline call survives an out-of-memory error
    in any component: vramkit re-plans for the memory free then, swaps the new plan in and repeats
    the failed component call (see ``pipe.vramkit_events``). ``recover=False`` leaves OOMs to the caller.

    Several GPUs: ``vram={"cuda:0": "12GiB", "cuda:1": "12GiB"}`` (or no ``vram`` on a machine with
    several CUDA devices) lets the plan put the transformer on one device and the text encoders and
    VAE on another; ``pipe._execution_device`` is then the transformer's device.

    ``compile=True`` (a planner keyword) also compiles the transformer's repeated blocks with
    ``torch.compile``, in the mode its placement allows (the plan step says which and why).
    """
    _pipeline.check_flux_pipeline(pipe)
    state = get_state(pipe)
    if state is not None and any(undo is not None for _, undo in state.applied):
        raise StrategyConflictError(
            "This pipeline is already optimized by vramkit (plan: "
            + ", ".join(s.strategy.name for s, _ in state.applied)
            + "). Call vramkit.restore(pipe) first, then optimize again."
        )
    _pipeline.check_no_foreign_hooks(pipe)
    _pipeline.check_not_meta(pipe)
    request: dict[str, Any] = dict(
        ram=ram,
        height=height,
        width=width,
        batch_size=batch_size,
        max_sequence_length=max_sequence_length,
        quality=quality,
        device=device,
        **planner_kwargs,
    )
    if isinstance(vram, Mapping):
        _device_budgets(vram)  # unknown devices fail here, before anything is planned or moved
    if strategies is not None:
        the_plan = plan_from_strategies(pipe, strategies)
    else:
        the_plan = _per_component(pipe, plan(pipe, vram=vram, **request))
        lossy = [f"{s.strategy.describe()} on {s.component or 'pipeline'}" for s in the_plan.steps if not s.lossless]
        if lossy:
            logger.warning(
                "vramkit chose steps that change numerics (quality=%r): %s. Pass quality='lossless' for "
                "output bit-identical to the unoptimized pipeline.", quality, "; ".join(lossy),
            )
    budget: int | None = None
    per_device: dict[str, int] | None = None
    if isinstance(vram, Mapping):
        per_device = _device_budgets(vram)
        budget = next(iter(per_device.values()))
    elif recover and vram is not None:
        from .memory.budget import parse_budget

        budget = parse_budget(vram, total=torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None)
    applied = _apply(pipe, the_plan)
    if recover:
        _install_recovery(pipe, budget, request, per_device)
    return applied


def _device_budgets(vram: Mapping[Any, int | str]) -> dict[str, int]:
    """Per-device budgets checked against the devices of this machine (applying a plan needs them)."""
    from .memory.budget import parse_device_budgets

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    totals = {f"cuda:{i}": torch.cuda.get_device_properties(i).total_memory for i in range(visible)}
    return parse_device_budgets(vram, totals=totals, visible=visible)


def _install_recovery(
    pipe: Any, budget: int | None, request: dict[str, Any], per_device: dict[str, int] | None = None
) -> None:
    from .recovery import RecoveryController, install_recovery

    state = get_state(pipe)
    assert state is not None
    if state.recovery_remove is not None:  # guards of an earlier optimize() (irreversible plan)
        state.recovery_remove()
        state.recovery_remove = None

    def budget_arg(new_budget: int | None) -> Any:
        # Recovery shrinks one number; across several devices every budget shrinks by the same share.
        if per_device is None or new_budget is None or budget is None:
            return new_budget if per_device is None else per_device
        return {d: max(1, int(v * new_budget / budget)) for d, v in per_device.items()}

    controller = RecoveryController(
        pipe=pipe,
        replan=lambda new_budget: _per_component(pipe, plan(pipe, vram=budget_arg(new_budget), **request)),
        swap_plan=lambda new_plan: _swap_plan(pipe, new_plan),
        budget=budget,
    )
    controller.install_guards = lambda: install_recovery(pipe, controller)
    state.recovery_remove = controller.remove_guards
    state.call_hooks["recovery"] = controller
    state.events = controller.events
    pipe.__dict__["vramkit_events"] = controller.events


def _swap_plan(pipe: Any, new_plan: Plan) -> Plan:
    """Undo the reversible steps of the applied plan and apply ``new_plan`` (recovery keeps its guards)."""
    state = get_state(pipe)
    assert state is not None
    remaining = _undo_all(pipe, state.applied)
    state.applied = [(step, None) for step in remaining]
    leftovers = {(step.strategy, step.component) for step in remaining}
    steps = [s for s in new_plan.steps if (s.strategy, s.component) not in leftovers]
    request = dict(new_plan.request)
    if state.plan is not None and "vram_outside_pipeline" in state.plan.request:
        request["vram_outside_pipeline"] = state.plan.request["vram_outside_pipeline"]
    trimmed = Plan(
        steps=steps, predicted=new_plan.predicted, rejected=new_plan.rejected,
        request=request, notes=new_plan.notes,
    )
    return _apply(pipe, trimmed)


def plan(
    pipe: Any,
    *,
    vram: int | str | Mapping[Any, int | str] | None = None,
    ram: int | str | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    max_sequence_length: int | None = None,
    quality: str = "auto",
    device: str | None = None,
    **planner_kwargs: Any,
) -> Plan:
    """The fastest plan that fits the budget for this request, without changing ``pipe``."""
    _pipeline.check_flux_pipeline(pipe)
    from .planner import plan_pipeline

    return plan_pipeline(
        pipe,
        vram=vram,
        ram=ram,
        height=height,
        width=width,
        batch_size=batch_size,
        max_sequence_length=max_sequence_length,
        quality=quality,
        device=device,
        **planner_kwargs,
    )


def restore(pipe: Any) -> None:
    """Undo every reversible step vramkit applied to ``pipe`` (in reverse order).

    If an irreversible step was applied (fp8 storage, quantization, deleted text encoders), the
    reversible ones are still undone, the pipeline keeps working in that form, and
    :class:`~vramkit.errors.IrreversibleError` names the steps that remain.
    """
    state = get_state(pipe)
    if state is None:
        return
    remaining = _undo_all(pipe, state.applied)
    remove_call_wrapper(pipe, state)
    state.call_hooks.clear()
    if state.recovery_remove is not None:
        state.recovery_remove()
        state.recovery_remove = None
    pipe.__dict__.pop("vramkit_plan", None)
    pipe.__dict__.pop("vramkit_events", None)
    if not remaining:
        set_state(pipe, None)
        return
    state.applied = [(step, None) for step in remaining]
    names = [f"{s.strategy.describe()} on {s.component or 'pipeline'}" for s in remaining]
    raise IrreversibleError(
        "Undid every reversible step, but these cannot be undone: " + "; ".join(names)
        + ". The pipeline still works in that form; reload it from disk to get the original weights.",
        steps=names,
    )
