"""Finding a model's repeated blocks and choosing which of them stay on the GPU.

A streamable model is "the rest" (embedders, norms, output projections: small, always resident)
plus one or more stacks of repeated blocks that run one after another. The engine keeps some blocks
resident and streams the others; which ones is decided here, from the block order alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["find_block_stacks", "choose_resident", "execution_order", "BLOCK_STACK_PATHS"]

#: Attribute paths of the repeated-block stacks, in execution order, for the architectures vramkit
#: streams: FluxTransformer2DModel and FluxControlNetModel (double-stream blocks, then single-stream
#: blocks) and T5EncoderModel / T5Stack (``encoder.block`` / ``block``).
BLOCK_STACK_PATHS: tuple[tuple[str, ...], ...] = (
    ("transformer_blocks", "single_transformer_blocks"),
    ("encoder.block",),
    ("block",),
)


def _get_path(module: nn.Module, path: str) -> nn.Module | None:
    obj: object = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def find_block_stacks(module: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The repeated-block stacks of ``module`` as ``(dotted name, ModuleList)``, in execution order.

    FluxTransformer2DModel and FluxControlNetModel give ``transformer_blocks`` then
    ``single_transformer_blocks``; T5EncoderModel gives ``encoder.block``. An unknown module gives
    an empty list (the caller decides whether that is an error). Empty stacks are left out.

    FluxMultiControlNetModel gives the stacks of each of its ``nets`` in turn (``nets.0.transformer_blocks``,
    ...), each net once even where it is listed twice: several modes of one union ControlNet run the
    same net once per control image, so its blocks simply run more than once per forward (the ring
    scheduler's expected order repeats).
    """
    nets = getattr(module, "nets", None)
    if isinstance(nets, nn.ModuleList) and len(nets) > 0:
        found = []
        seen: set[int] = set()
        for i, net in enumerate(nets):
            if id(net) in seen:
                continue
            seen.add(id(net))
            found.extend((f"nets.{i}.{path}", stack) for path, stack in find_block_stacks(net))
        return found
    for paths in BLOCK_STACK_PATHS:
        found: list[tuple[str, nn.ModuleList]] = []
        for path in paths:
            stack = _get_path(module, path)
            if isinstance(stack, nn.ModuleList) and len(stack) > 0:
                found.append((path, stack))
        if found:
            return found
    return []


def execution_order(stacks: Sequence[tuple[str, nn.ModuleList]]) -> list[tuple[str, int, nn.Module]]:
    """Every block as ``(stack name, index in its stack, block)`` in the order the model runs them."""
    return [(name, i, block) for name, stack in stacks for i, block in enumerate(stack)]


def choose_resident(blocks: Sequence[object] | int, resident: int) -> set[int]:
    """Positions (in execution order) of the ``resident`` blocks to keep on the GPU.

    The resident blocks are spread evenly through the execution order, so every streamed block has
    resident compute before it to hide its copy behind (a contiguous run of streamed blocks would
    leave the copy engine as the only thing working). Position ``floor((i + 1/2) * n / r)`` for
    ``i < r``: distinct because the step ``n / r`` is at least 1, and deterministic.

    ``blocks`` is the block sequence (or just its length); ``resident`` is clipped to ``[0, n]``.
    """
    n = blocks if isinstance(blocks, int) else len(blocks)
    if isinstance(resident, bool) or not isinstance(resident, int):
        raise TypeError(f"resident must be an int, got {resident!r}")
    r = max(0, min(int(resident), n))
    if r == 0:
        return set()
    if r == n:
        return set(range(n))
    # Integer arithmetic: floor((2i + 1) * n / (2r)), exact for any n, r.
    return {((2 * i + 1) * n) // (2 * r) for i in range(r)}


def module_tensors(module: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """Every parameter and buffer of ``module`` as ``(owner, name, kind, tensor)``.

    ``kind`` is ``"parameter"`` or ``"buffer"``. A tensor registered under two names is listed under
    each (the caller dedupes by identity where that matters).
    """
    out: list[tuple[nn.Module, str, str, torch.Tensor]] = []
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                out.append((sub, name, "parameter", p))
        for name, b in sub._buffers.items():
            if b is not None:
                out.append((sub, name, "buffer", b))
    return out
