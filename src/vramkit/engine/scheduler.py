"""The ring scheduler: which streamed block goes into which GPU slot, and when its copy is issued.

Pure bookkeeping over a :class:`~vramkit.engine.copier.Copier`; it knows nothing about modules, so
its logic runs (and is tested) identically on CPU and GPU.

The expected order is the streamed blocks in execution order, repeated forever (a forward runs them
all, the next forward starts again: the wrap-around is prefetched during the previous forward's last
blocks). With ``K`` slots, at most ``K`` blocks are loaded or loading at once: the one running and
``K - 1`` copied ahead. A block's slot is freed right after its compute has been issued, and the
freed slot immediately receives the next expected block, so the copy engine runs ahead by
``K - 1`` blocks and never waits on the host.

Order changes are handled without ever giving wrong weights:

- a block that is further down the window (the blocks before it were skipped, e.g. by a caching
  hook) is taken from the window, the skipped copies are simply abandoned;
- a block whose bytes are still in a free slot from earlier is reused without a copy;
- anything else is a *fallback*: the window is dropped and the block is copied on demand (the
  compute waits for that copy), then the expected order resumes after it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .copier import Copier

__all__ = ["RingScheduler", "StreamingStats"]


@dataclass
class StreamingStats:
    """Counters the benchmark and profiler read (``reset()`` between measurements).

    ``copies``/``bytes_copied``: host-to-device copies issued and their bytes. ``prefetch_hits``:
    blocks found already copied (or in flight) ahead of use. ``reuses``: blocks still in a slot
    from an earlier use (no copy). ``skips``: prefetched blocks that were not run. ``fallbacks``:
    blocks copied on demand because the order differed from the expected one (the compute waited
    for the copy). ``forwards``: calls of the streamed module.
    """

    forwards: int = 0
    copies: int = 0
    bytes_copied: int = 0
    prefetch_hits: int = 0
    reuses: int = 0
    skips: int = 0
    fallbacks: int = 0

    @property
    def bytes_per_forward(self) -> float:
        return self.bytes_copied / self.forwards if self.forwards else 0.0

    @property
    def copies_per_forward(self) -> float:
        return self.copies / self.forwards if self.forwards else 0.0

    def reset(self) -> None:
        self.forwards = self.copies = self.bytes_copied = 0
        self.prefetch_hits = self.reuses = self.skips = self.fallbacks = 0

    def as_dict(self) -> dict[str, float]:
        return {
            "forwards": self.forwards,
            "copies": self.copies,
            "bytes_copied": self.bytes_copied,
            "bytes_per_forward": self.bytes_per_forward,
            "copies_per_forward": self.copies_per_forward,
            "prefetch_hits": self.prefetch_hits,
            "reuses": self.reuses,
            "skips": self.skips,
            "fallbacks": self.fallbacks,
        }


class RingScheduler:
    """Drives ``num_slots`` slots for the streamed blocks ``order`` (positions, execution order).

    ``source(pos)`` gives the host uint8 buffer of a block and ``target(pos, k)`` the device uint8
    buffer it is copied into when it goes to slot ``k`` (a prefix of the slot, made once up front:
    nothing is allocated or sliced inside a step). Call :meth:`begin_forward` at the start of every
    forward of the module, :meth:`acquire` before a streamed block runs (returns its slot) and
    :meth:`release` once its compute has been issued.
    """

    def __init__(
        self,
        order: Sequence[int],
        num_slots: int,
        source: Callable[[int], torch.Tensor],
        target: Callable[[int, int], torch.Tensor],
        copier: Copier,
        stats: StreamingStats | None = None,
    ) -> None:
        if len(set(order)) != len(order):
            raise ValueError("streamed block order lists a block twice")
        self.order = list(order)
        self.index_of = {pos: i for i, pos in enumerate(self.order)}
        self.source = source
        self.target = target
        self.copier = copier
        self.stats = stats if stats is not None else StreamingStats()
        k = int(num_slots)
        if self.order and k == 0:
            raise ValueError("streaming needs at least one slot")
        # (pos, slot) issued ahead, in expected order.
        self.window: deque[tuple[int, int]] = deque()
        # Slots nobody is loading for or running; oldest freed first.
        self.free: deque[int] = deque(range(k))
        # What each slot holds (or will hold once its last copy lands); None = nothing valid.
        self.content: list[int | None] = [None] * k
        # slot -> pos of blocks acquired and not yet released.
        self.busy: dict[int, int] = {}
        self.next_index = 0

    # --- public API ---------------------------------------------------------------------------

    def begin_forward(self) -> None:
        """Start of a forward: reclaim slots of blocks that never released (an exception inside a
        previous forward), then make sure the next blocks are on their way."""
        for slot in list(self.busy):
            del self.busy[slot]
            self.copier.mark_free(slot)
            self.free.append(slot)
        self.refill()

    def acquire(self, pos: int) -> int:
        """The slot holding block ``pos``, ordered so the compute issued next sees its bytes."""
        if pos not in self.index_of:
            raise KeyError(f"block {pos} is not streamed")
        slot = self._take(pos)
        self.copier.wait_ready(slot)
        self.busy[slot] = pos
        self.refill()
        return slot

    def release(self, pos: int, slot: int) -> None:
        """Block ``pos`` has issued all its reads of ``slot``: free it and prefetch into it."""
        if self.busy.get(slot) != pos:
            return  # reclaimed by begin_forward after an aborted forward
        del self.busy[slot]
        self.copier.mark_free(slot)
        self.free.append(slot)
        self.refill()

    # --- internals ----------------------------------------------------------------------------

    def _take(self, pos: int) -> int:
        for i, (wpos, slot) in enumerate(self.window):
            if wpos == pos:
                for _ in range(i):
                    # Skipped ahead: those copies are abandoned. Their slots had no reader since
                    # their copy, so they can be reused without any extra ordering.
                    _, skipped_slot = self.window.popleft()
                    self.free.append(skipped_slot)
                    self.stats.skips += 1
                self.window.popleft()
                self.stats.prefetch_hits += 1
                return slot
        # Not where expected: drop the window (the copies stay valid contents of free slots).
        while self.window:
            _, slot = self.window.popleft()
            self.free.append(slot)
        self.next_index = (self.index_of[pos] + 1) % len(self.order)
        for slot in self.free:
            if self.content[slot] == pos:
                self.free.remove(slot)
                self.stats.reuses += 1
                return slot
        slot = self._pick_free_slot()
        self._issue(pos, slot)
        self.stats.fallbacks += 1
        return slot

    def _pick_free_slot(self) -> int:
        """A free slot to overwrite: an empty one, else the one whose block is needed last."""
        m = len(self.order)
        best, best_distance = self.free[0], -1
        for slot in self.free:
            held = self.content[slot]
            if held is None:
                best = slot
                break
            distance = (self.index_of[held] - self.next_index) % m
            if distance > best_distance:
                best, best_distance = slot, distance
        self.free.remove(best)
        return best

    def _issue(self, pos: int, slot: int) -> None:
        src = self.source(pos)
        n = src.numel()
        self.copier.copy(slot, self.target(pos, slot), src)
        self.content[slot] = pos
        self.stats.copies += 1
        self.stats.bytes_copied += n

    def refill(self) -> None:
        """Issue the next expected blocks into free slots."""
        if not self.order:
            return
        m = len(self.order)
        while self.free:
            pos = self.order[self.next_index]
            if pos in self.busy.values() or any(p == pos for p, _ in self.window):
                return  # fewer streamed blocks than slots: everything is loaded
            held = [s for s in self.free if self.content[s] == pos]
            if held:
                slot = held[0]
                self.free.remove(slot)
                self.stats.reuses += 1
            else:
                slot = self._pick_free_slot()
                self._issue(pos, slot)
            self.window.append((pos, slot))
            self.next_index = (self.next_index + 1) % m
