"""Choosing how many blocks stay resident for a memory budget (shapes only; no GPU needed)."""

from __future__ import annotations

from torch import nn

from ..errors import PlanInfeasibleError
from .layout import ALIGNMENT, StreamingLayout, layout_from_blocks, packed_blocks

__all__ = ["max_resident_for_budget"]


def max_resident_for_budget(
    module: nn.Module,
    budget: int,
    prefetch: int = 1,
    storage: str | None = None,
    pinned_limit: int | None = None,
    alignment: int = ALIGNMENT,
    unit: str = "block",
) -> StreamingLayout:
    """The layout with the most resident blocks whose weights fit in ``budget`` bytes of GPU memory.

    ``budget`` covers the weights only: the rest of the module, the resident blocks, the ring slots
    and the decode scratch (:attr:`StreamingLayout.device_nbytes`); leave activations out of it.
    Every count is tried (the ring shrinks when the largest blocks become resident, so the memory
    is not monotonic in the count). Raises :class:`PlanInfeasibleError` (with ``minimum_vram``)
    when not even zero resident blocks fit. Works on a meta-device model. ``unit="part"`` counts and
    streams the blocks' parts instead (:func:`~vramkit.engine.layout.compute_layout`).
    """
    stacks, packed, rest = packed_blocks(module, storage, alignment, unit=unit)
    smallest: StreamingLayout | None = None
    for r in range(len(packed), -1, -1):
        layout = layout_from_blocks(stacks, packed, rest, r, prefetch, storage, pinned_limit, alignment, unit)
        if layout.device_nbytes <= budget:
            return layout
        if smallest is None or layout.device_nbytes < smallest.device_nbytes:
            smallest = layout
    assert smallest is not None
    raise PlanInfeasibleError(
        f"{type(module).__name__}: even with no resident block its weights need "
        f"{smallest.device_nbytes / 2**30:.2f} GiB of GPU memory (the rest, {smallest.num_slots} ring slots"
        f" and the scratch), more than the {budget / 2**30:.2f} GiB budget.",
        minimum_vram=smallest.device_nbytes,
    )
