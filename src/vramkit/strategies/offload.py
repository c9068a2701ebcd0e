"""Mechanisms for ``ModelOffload`` and ``SequentialOffload``, on accelerate's hooks (the same hooks
diffusers' ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload`` use), with an exact undo."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .._pipeline import model_components
from .._state import get_state
from ..errors import StrategyConflictError
from .base import Undo, register_strategy
from .configs import ModelOffload, Resident, SequentialOffload
from .placement import bind_device

logger = logging.getLogger("vramkit")


def resolve_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _component_device(module: torch.nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")


def _mark_ours(module: torch.nn.Module) -> None:
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        if hook is not None:
            hook._vramkit = True


def _remove_accelerate_hooks(module: torch.nn.Module) -> None:
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(module, recurse=True)
    # accelerate puts the original bound ``forward`` back as an instance attribute; drop it so the
    # module is exactly as before (forward resolved on the class).
    for sub in module.modules():
        bound = sub.__dict__.get("forward")
        if bound is not None and getattr(bound, "__func__", None) is getattr(type(sub), "forward", None):
            del sub.__dict__["forward"]


class _OffloadAfterCall:
    """After each pipeline call, send every offloaded component back to host RAM (diffusers does
    this in ``maybe_free_model_hooks``, which only knows its own hooks)."""

    def __init__(self, hooks: list[Any]) -> None:
        self.hooks = hooks

    def before_call(self, pipe: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        return None

    def after_call(self, pipe: Any) -> None:
        for hook in self.hooks:
            hook.offload()


def _offloadable(pipe: Any, requested: tuple[str, ...] | None) -> dict[str, torch.nn.Module]:
    comps = model_components(pipe)
    state = get_state(pipe)
    placed = state.placed if state is not None else {}
    if requested is None:
        return {n: m for n, m in comps.items() if n not in placed}
    clash = [n for n in requested if n in placed]
    if clash:
        raise StrategyConflictError(
            f"ModelOffload: {clash} already placed by {[placed[n] for n in clash]}; leave them out of components=."
        )
    missing = [n for n in requested if n not in comps]
    if missing:
        from ..errors import InvalidRequestError

        raise InvalidRequestError(f"ModelOffload: unknown component(s) {missing}; this pipeline has {sorted(comps)}.")
    return {n: comps[n] for n in requested}


@register_strategy(ModelOffload)
def apply_model_offload(pipe: Any, config: ModelOffload, component: str | None) -> Undo | None:
    from accelerate import cpu_offload_with_hook

    device = resolve_device(config.device)
    targets = _offloadable(pipe, config.components)
    original_devices = {n: _component_device(m) for n, m in targets.items()}
    seq = [n for n in getattr(pipe, "model_cpu_offload_seq", "").split("->") if n in targets]
    hooks: list[Any] = []
    prev = None
    try:
        for name in seq:
            _, prev = cpu_offload_with_hook(targets[name], device, prev_module_hook=prev)
            hooks.append(prev)
        # Components called inside the denoising loop next to the transformer (the ControlNet) stay
        # out of the chain: chaining them would move both models every step.
        for name, module in targets.items():
            if name not in seq:
                _, hook = cpu_offload_with_hook(module, device)
                hooks.append(hook)
    except Exception:
        for module in targets.values():
            _remove_accelerate_hooks(module)
        for n, m in targets.items():
            m.to(original_devices[n])
        raise
    for module in targets.values():
        _mark_ours(module)
    state = get_state(pipe)
    if state is not None:
        state.call_hooks["ModelOffload"] = _OffloadAfterCall(hooks)
        for name in targets:
            state.placed[name] = "ModelOffload"
    logger.info("ModelOffload: %s kept in host RAM, each moved to %s when it runs", list(targets), device)

    def undo() -> None:
        if state is not None:
            state.call_hooks.pop("ModelOffload", None)
            for name in targets:
                state.placed.pop(name, None)
        for name, module in targets.items():
            _remove_accelerate_hooks(module)
            module.to(original_devices[name])

    return undo


@register_strategy(SequentialOffload)
def apply_sequential_offload(pipe: Any, config: SequentialOffload, component: str | None) -> Undo | None:
    from accelerate import cpu_offload

    device = resolve_device(config.device)
    state = get_state(pipe)
    comps = {n: m for n, m in model_components(pipe).items() if state is None or n not in state.placed}
    original_devices = {n: _component_device(m) for n, m in comps.items()}
    # accelerate replaces every weight with a meta tensor and keeps the CPU copy in its hook; keep
    # references to the original CPU tensors (no extra memory) so undo can put them back exactly.
    saved: dict[str, list[tuple[torch.nn.Module, str, str, torch.Tensor]]] = {}
    for name, module in comps.items():
        module.to("cpu")
        entries = []
        for sub in module.modules():
            for pname, p in sub._parameters.items():
                if p is not None:
                    entries.append((sub, "_parameters", pname, p))
            for bname, b in sub._buffers.items():
                if b is not None:
                    entries.append((sub, "_buffers", bname, b))
        saved[name] = entries

    def put_back(name: str) -> None:
        module = comps[name]
        _remove_accelerate_hooks(module)
        for sub, kind, key, tensor in saved[name]:
            getattr(sub, kind)[key] = tensor
        module.to(original_devices[name])

    done: list[str] = []
    try:
        for name, module in comps.items():
            cpu_offload(module, execution_device=device, offload_buffers=True)
            done.append(name)
            _mark_ours(module)
    except Exception:
        for name in comps:
            put_back(name)
        raise
    if state is not None:
        for name in comps:
            state.placed[name] = "SequentialOffload"
    logger.info("SequentialOffload: every layer of %s streams to %s just before it runs", list(comps), device)

    def undo() -> None:
        for name in comps:
            put_back(name)
            if state is not None:
                state.placed.pop(name, None)

    return undo


@register_strategy(Resident)
def apply_resident(pipe: Any, config: Resident, component: str | None) -> Undo | None:
    device = resolve_device(config.device)
    module = getattr(pipe, component)
    original = _component_device(module)
    module.to(device)
    # An explicit device may differ from the pipeline's execution device (several GPUs): route the
    # component's inputs and outputs across devices. Without one, everything shares one device.
    unbind = bind_device(pipe, component, module, device) if config.device is not None else None
    state = get_state(pipe)
    if state is not None:
        state.placed[component] = "Resident"

    def undo() -> None:
        if unbind is not None:
            unbind()
        module.to(original)
        if state is not None:
            state.placed.pop(component, None)

    return undo
