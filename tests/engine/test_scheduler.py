"""The ring scheduler's ordering logic, driven directly with a checking copier (no model).

Each "block" is a small byte pattern in host memory; a slot is read right after ``acquire`` (as a
block's compute would) and must hold exactly that block's bytes. The :class:`CheckingCopier`
applies a copy only when its slot is waited on and raises on an overwrite while in use, so a
missing wait or an early overwrite fails here instead of passing by luck.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vramkit.engine import CheckingCopier, CopyOrderError, RingScheduler, StreamingStats


class Harness:
    def __init__(self, order: list[int], num_slots: int, size: int = 16, mode: str = "lazy") -> None:
        self.host = {p: torch.full((size + p,), p + 1, dtype=torch.uint8) for p in order}
        self.slots = [torch.empty(size + max(order), dtype=torch.uint8) for _ in range(num_slots)]
        self.copier = CheckingCopier(mode)
        self.stats = StreamingStats()
        self.sched = RingScheduler(
            order,
            num_slots,
            source=lambda p: self.host[p],
            target=lambda p, k: self.slots[k][: self.host[p].numel()],
            copier=self.copier,
            stats=self.stats,
        )

    def run(self, pos: int) -> None:
        slot = self.sched.acquire(pos)
        n = self.host[pos].numel()
        assert torch.equal(self.slots[slot][:n], self.host[pos]), f"block {pos} saw stale bytes in slot {slot}"
        self.sched.release(pos, slot)

    def forward(self, blocks: list[int]) -> None:
        self.sched.begin_forward()
        for p in blocks:
            self.run(p)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("slots", [1, 2, 3, 4])
def test_steady_cyclic_order_prefetches_everything(m: int, slots: int) -> None:
    order = list(range(0, 2 * m, 2))  # positions need not be contiguous
    h = Harness(order, min(slots, m))
    for _ in range(4):
        h.forward(order)
    assert h.stats.fallbacks == 0 and h.stats.skips == 0
    assert h.stats.prefetch_hits == 4 * m
    if m <= slots:
        # Every block has a slot of its own: copied once, then reused forever.
        assert h.copier.copies == m
    else:
        # One copy per block run (into the slot it frees), plus the first fill of every slot.
        assert h.copier.copies == 4 * m + len(h.slots)


def test_prefetch_depth_and_wraparound() -> None:
    order = [0, 1, 2, 3, 4]
    h = Harness(order, 3)
    h.sched.begin_forward()
    # Primed: the first three blocks are on their way before anything runs.
    assert [p for p, _ in h.sched.window] == [0, 1, 2]
    h.run(0)
    assert [p for p, _ in h.sched.window] == [1, 2, 3]
    for p in (1, 2, 3, 4):
        h.run(p)
    # The next forward's first blocks were issued during this forward's last blocks.
    assert [p for p, _ in h.sched.window] == [0, 1, 2]
    copies = h.copier.copies
    h.forward(order)
    assert h.copier.copies == copies + 5 and h.stats.fallbacks == 0


def test_skipped_blocks_are_abandoned_not_waited() -> None:
    order = [0, 1, 2, 3, 4, 5]
    h = Harness(order, 3)
    h.forward(order)
    # A caching hook skips blocks 1 and 2 in this forward.
    h.forward([0, 3, 4, 5])
    assert h.stats.fallbacks == 0 and h.stats.skips == 2
    h.forward(order)
    assert h.stats.fallbacks == 0


def test_out_of_order_falls_back_and_stays_correct() -> None:
    order = [0, 1, 2, 3]
    h = Harness(order, 2)
    h.forward(order)
    h.forward([3, 2, 1, 0])
    assert h.stats.fallbacks > 0
    before = h.stats.fallbacks
    h.forward(order)
    h.forward(order)
    # The expected order resumes after a fallback: at most one more fallback to re-anchor.
    assert h.stats.fallbacks <= before + 1


def test_aborted_forward_reclaims_its_slot() -> None:
    order = [0, 1, 2]
    h = Harness(order, 2)
    h.sched.begin_forward()
    h.run(0)
    h.sched.acquire(1)  # the block raises: release never comes
    h.forward(order)  # the next forward reclaims the slot and runs correctly
    h.forward(order)
    assert not h.sched.busy


def test_the_checking_copier_catches_a_missing_mark_free() -> None:
    copier = CheckingCopier()
    a, b = torch.zeros(4, dtype=torch.uint8), torch.ones(4, dtype=torch.uint8)
    slot = torch.empty(4, dtype=torch.uint8)
    copier.copy(0, slot, a)
    copier.wait_ready(0)
    with pytest.raises(CopyOrderError):
        copier.copy(0, slot, b)
    copier.mark_free(0)
    copier.copy(0, slot, b)
    assert torch.equal(slot, a)  # deferred until waited on
    copier.wait_ready(0)
    assert torch.equal(slot, b)


def test_unknown_block_is_an_error() -> None:
    h = Harness([0, 1], 2)
    h.sched.begin_forward()
    with pytest.raises(KeyError):
        h.sched.acquire(7)


@settings(max_examples=150, deadline=None)
@given(
    m=st.integers(1, 7),
    slots=st.integers(1, 4),
    calls=st.lists(st.lists(st.integers(0, 6), max_size=12), min_size=1, max_size=6),
    abort=st.booleans(),
    mode=st.sampled_from(["lazy", "eager"]),
)
def test_any_access_pattern_sees_the_right_bytes(
    m: int, slots: int, calls: list[list[int]], abort: bool, mode: str
) -> None:
    order = list(range(m))
    h = Harness(order, min(slots, m), mode=mode)
    for i, call in enumerate(calls):
        blocks = [p % m for p in call]
        h.sched.begin_forward()
        for j, p in enumerate(blocks):
            if abort and i == 0 and j == len(blocks) - 1:
                h.sched.acquire(p)  # raised inside the block
                break
            h.run(p)
    h.forward(order)
    h.forward(order)
    # Whatever happened before, two clean forwards in order end with no on-demand copy.
    before = h.stats.fallbacks
    h.forward(order)
    assert h.stats.fallbacks == before
