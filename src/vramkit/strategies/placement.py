"""Running a pipeline whose components live on different devices (several GPUs).

diffusers' Flux pipelines create every input on ``pipe._execution_device`` and call each component
with it. A component placed on another device (``Resident(device="cuda:1")``,
``BlockStreaming(device="cuda:1")``) gets a ``vramkit_device`` hook, through diffusers'
:class:`~diffusers.hooks.HookRegistry` like the streaming engine's hooks: its inputs move to its
device, its outputs move back to the device the inputs came from. While a step binds the
transformer to a device, the pipeline's ``_execution_device`` is that device (see
:mod:`vramkit._state`). Removing the hook puts ``forward`` back exactly as it was.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .._state import get_state
from .base import Undo

__all__ = ["DeviceHook", "HOOK_DEVICE", "bind_device", "entry_modules", "first_device"]

logger = logging.getLogger("vramkit")

HOOK_DEVICE = "vramkit_device"

# An autoencoder is called through ``encode``/``decode``, which are not ``forward``: hook the
# submodules those methods call instead (the convolutions are absent when a config turns them off).
_AUTOENCODER_PARTS = ("encoder", "quant_conv", "post_quant_conv", "decoder")


def first_device(obj: Any) -> torch.device | None:
    """The device of the first tensor in ``obj`` (nested tuples, lists, dicts), or ``None``."""
    if isinstance(obj, torch.Tensor):
        return obj.device
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = first_device(item)
            if found is not None:
                return found
    return None


def _send(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor on ``device`` (accelerate keeps tuples, dicts and transformers'
    ``ModelOutput`` types; a tensor already there is returned as is, so nothing is copied)."""
    from accelerate.utils import send_to_device

    return send_to_device(obj, device)


class DeviceHook(ModelHook):  # type: ignore[misc]
    """Runs a module on ``device``: inputs go there, outputs go back to where the inputs were.
    Stateless around each call (``new_forward``), so an exception inside leaves nothing behind."""

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        origin = first_device((args, kwargs))
        args, kwargs = _send(args, self.device), _send(kwargs, self.device)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if origin is None or origin == self.device:
            return output
        return _send(output, origin)


def entry_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules a pipeline calls ``forward`` on for this component: the component itself, or the
    parts an autoencoder's ``encode``/``decode`` call."""
    if callable(getattr(module, "decode", None)) and isinstance(getattr(module, "decoder", None), torch.nn.Module):
        return [m for m in (getattr(module, p, None) for p in _AUTOENCODER_PARTS) if isinstance(m, torch.nn.Module)]
    return [module]


def bind_device(pipe: Any, component: str, module: torch.nn.Module, device: torch.device) -> Undo:
    """Route ``component``'s calls through ``device`` (its weights are already there) and record the
    device on the pipeline's vramkit state. Returns the exact undo."""
    hooked: list[tuple[torch.nn.Module, bool, bool]] = []
    try:
        for target in entry_modules(module):
            had_registry = hasattr(target, "_diffusers_hook")
            had_forward = "forward" in target.__dict__
            HookRegistry.check_if_exists_or_initialize(target).register_hook(DeviceHook(device), HOOK_DEVICE)
            hooked.append((target, had_registry, had_forward))
    except BaseException:
        _unhook(hooked)
        raise
    state = get_state(pipe)
    if state is not None:
        state.devices[component] = device
    logger.debug("%s runs on %s; inputs and outputs cross devices through a %s hook", component, device, HOOK_DEVICE)

    def undo() -> None:
        _unhook(hooked)
        if state is not None and state.devices.get(component) == device:
            del state.devices[component]

    return undo


def _unhook(hooked: list[tuple[torch.nn.Module, bool, bool]]) -> None:
    for target, had_registry, had_forward in reversed(hooked):
        registry = getattr(target, "_diffusers_hook", None)
        if registry is None:
            continue
        registry.remove_hook(HOOK_DEVICE, recurse=False)
        if not registry.hooks:
            # diffusers leaves the bound original ``forward`` as an instance attribute; an empty
            # registry vramkit made goes too (one made by someone else stays).
            if not had_forward:
                target.__dict__.pop("forward", None)
            if not had_registry:
                del target._diffusers_hook
    hooked.clear()
