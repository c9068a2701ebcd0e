"""Mechanism for ``Compile``: regional ``torch.compile`` of the repeated blocks."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .._state import get_state
from ..errors import InvalidRequestError, StrategyConflictError
from .base import Undo, register_strategy
from .configs import Compile

logger = logging.getLogger("vramkit")

# Repeated block classes by name, for models that do not declare diffusers' ``_repeated_blocks``.
_KNOWN_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock", "T5Block", "CLIPEncoderLayer")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
_MOVING = ("BlockStreaming", "ModelOffload", "SequentialOffload")


def repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    names = tuple(getattr(module, "_repeated_blocks", None) or ()) or _KNOWN_BLOCKS
    return [m for m in module.modules() if type(m).__name__ in names]


@register_strategy(Compile)
def apply_compile(pipe: Any, config: Compile, component: str | None) -> Undo | None:
    module = getattr(pipe, component)
    state = get_state(pipe)
    placed_by = state.placed.get(component) if state is not None else None
    if config.mode in _CUDA_GRAPH_MODES and placed_by in _MOVING:
        raise StrategyConflictError(
            f"Compile(mode={config.mode!r}) on {component}: CUDA graphs replay fixed weight addresses, but "
            f"{placed_by} moves this component's weights. Use mode='max-autotune-no-cudagraphs' (or None)."
        )
    blocks = repeated_blocks(module)
    if not blocks:
        raise InvalidRequestError(f"Compile: {component} ({type(module).__name__}) has no repeated blocks to compile.")
    kwargs: dict[str, Any] = {"backend": config.backend}
    if config.mode is not None:
        kwargs["mode"] = config.mode
    if config.dynamic is not None:
        kwargs["dynamic"] = config.dynamic
    for block in blocks:
        block.compile(**kwargs)
    logger.info("Compile: %d repeated blocks of %s compiled (%s)", len(blocks), component, kwargs)

    def undo() -> None:
        for block in blocks:
            block._compiled_call_impl = None

    return undo
