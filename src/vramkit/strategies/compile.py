"""Mechanism for ``Compile``: regional ``torch.compile`` of the repeated blocks."""

from __future__ import annotations

import functools
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
    _refuse_part_streaming(module, component)
    blocks = repeated_blocks(module)
    if not blocks:
        raise InvalidRequestError(f"Compile: {component} ({type(module).__name__}) has no repeated blocks to compile.")
    kwargs: dict[str, Any] = {"backend": config.backend}
    if config.mode is not None:
        kwargs["mode"] = config.mode
    if config.dynamic is not None:
        kwargs["dynamic"] = config.dynamic
    undos = []
    shared: dict[type, Any] = {}
    for block in blocks:
        undos.append(_compile_block(block, kwargs, shared))
    logger.info("Compile: %d repeated blocks of %s compiled (%s)", len(blocks), component, kwargs)

    def undo() -> None:
        for restore in reversed(undos):
            restore()

    return undo


def _refuse_part_streaming(module: torch.nn.Module, component: str | None) -> None:
    """Streaming by parts hooks the children of each block, not the block: compiling the block's
    forward would trace those hooks' Python (slot bookkeeping, per-part guards) into the graph and
    recompile for every part. Refused rather than silently slow."""
    from ..engine.streamer import streamer_of

    for sub in module.modules():
        streamer = streamer_of(sub)
        if streamer is not None and streamer.layout.unit == "part":
            raise StrategyConflictError(
                f"Compile on {component}: its blocks are streamed by parts (BlockStreaming(unit='part')), "
                "and a compiled block would trace the part hooks. Use unit='block' with Compile."
            )


def _compile_block(block: torch.nn.Module, kwargs: dict[str, Any], shared: dict[type, Any]) -> Any:
    """Compile one repeated block; returns its undo.

    A block with hooks (vramkit's streaming, diffusers' offloading) is compiled *beneath* them: the
    forward the first hook wraps is replaced by one compiled function shared by every block of its
    class, with the block as an argument. Compiling the block's ``__call__`` instead would trace the
    hooks' Python code (slot bookkeeping, guards on each block's position) and recompile for every
    block until torch._dynamo's cache limit, then run eagerly.
    """
    registry = getattr(block, "_diffusers_hook", None)
    fn_refs = getattr(registry, "_fn_refs", None) if registry is not None else None
    if fn_refs:
        fn_ref = fn_refs[0]
        original = fn_ref.forward
        cls = type(block)
        if cls not in shared:
            shared[cls] = torch.compile(cls.forward, **kwargs)
        fn_ref.forward = functools.partial(shared[cls], block)

        def restore_hooked() -> None:
            fn_ref.forward = original

        return restore_hooked
    block.compile(**kwargs)

    def restore_plain() -> None:
        block._compiled_call_impl = None

    return restore_plain
