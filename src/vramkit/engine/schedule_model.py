"""A tiny timing model of one pass over the blocks through the ring (pure arithmetic, no GPU).

It mirrors what :class:`~vramkit.engine.scheduler.RingScheduler` does with a copy stream and a
compute stream: one copy at a time, each streamed block into the next ring slot, the slot reused only
once the block that used it before has finished computing. It is what shows why the resident blocks
are placed by compute (:func:`~vramkit.engine.blocks.choose_resident`): the step ends at the later of
the two engines, phase by phase, not at the larger of the two totals.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = ["simulate_step"]


def simulate_step(copy_s: Sequence[float], compute_s: Sequence[float], streamed: Collection[int], slots: int) -> float:
    """Seconds from the start of a pass until the last block has computed.

    ``copy_s`` and ``compute_s`` give each block's copy and compute time in execution order;
    ``streamed`` the positions of the streamed blocks; ``slots`` the ring size. The copy of the k-th
    streamed block starts once the copy engine is free and its slot is free (the slot frees when the
    compute of streamed block ``k - slots``, which used it before, ends); block ``p`` computes once
    block ``p - 1`` has computed and, if streamed, once its copy has ended. Everything starts at 0:
    no copy from a previous pass is in flight.
    """
    if len(copy_s) != len(compute_s):
        raise ValueError(f"{len(copy_s)} copy times but {len(compute_s)} compute times")
    index = {pos: k for k, pos in enumerate(sorted(streamed))}
    if index and slots < 1:
        raise ValueError(f"slots={slots}: streaming needs at least one ring slot")
    order = sorted(index)
    compute_end: list[float] = []
    copy_free = 0.0  # when the copy engine finishes its last issued copy
    done = 0.0  # when the compute engine finishes its last block
    for pos, compute in enumerate(compute_s):
        ready = done
        k = index.get(pos)
        if k is not None:
            # The slot's previous user (streamed block k - slots) comes earlier: its end is known.
            slot_free = compute_end[order[k - slots]] if k >= slots else 0.0
            copy_free = max(copy_free, slot_free) + copy_s[pos]
            ready = max(ready, copy_free)
        done = ready + compute
        compute_end.append(done)
    return done
