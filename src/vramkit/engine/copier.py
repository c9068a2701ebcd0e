"""Copy engines: how a packed block gets into a ring slot, and how the ordering is enforced.

The scheduler (:mod:`vramkit.engine.scheduler`) decides *what* goes into which slot and when; a
copier does the copy and provides the two orderings the ring needs:

- ``wait_ready(slot)``: work issued after this (the block's compute) sees the slot's latest copy;
- ``mark_free(slot)``: the next copy into the slot waits for everything issued before this (the
  compute that read the slot).

:class:`CudaStreamCopier` implements them with a side CUDA stream and two events per slot, never
synchronizing the host. :class:`SyncCopier` copies immediately on the current stream (correct
anywhere, no overlap). :class:`CheckingCopier` is for tests on CPU: it defers every copy until its
slot is waited on and fails loudly when a slot is overwritten while a reader may still use it, so a
scheduling mistake shows up as wrong weights or an exception rather than passing by luck.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque

import torch

__all__ = ["Copier", "SyncCopier", "CudaStreamCopier", "CheckingCopier", "CopyOrderError"]


class CopyOrderError(AssertionError):
    """A slot was overwritten while its previous contents could still be read (a scheduler bug)."""


class Copier(ABC):
    """Moves packed bytes into ring slots and orders them against compute (see module docstring)."""

    @abstractmethod
    def copy(self, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` (host uint8) into ``dst`` (a prefix of slot ``slot``), after the slot's last
        ``mark_free``."""

    @abstractmethod
    def wait_ready(self, slot: int) -> None:
        """Make work issued from now on wait for the latest copy into ``slot``."""

    @abstractmethod
    def mark_free(self, slot: int) -> None:
        """Record that everything issued so far is all that reads ``slot``'s current contents."""

    def synchronize(self) -> None:  # noqa: B027 - optional: copiers that copy at once need nothing
        """Wait (on the host) until every copy issued has finished."""

    def close(self) -> None:  # noqa: B027 - optional
        """Drop streams and events."""


class SyncCopier(Copier):
    """Copy at once on the current stream: trivially ordered, nothing overlaps."""

    def copy(self, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def wait_ready(self, slot: int) -> None:
        return None

    def mark_free(self, slot: int) -> None:
        return None


class CudaStreamCopier(Copier):
    """Copies on a side CUDA stream; per slot, a copy-done event (waited by the compute stream
    before the block runs) and a compute-done event (waited by the copy stream before the slot is
    overwritten). The host never waits inside a step.

    Events are reused: ``cudaStreamWaitEvent`` captures the event's most recent record at the time
    of the call, so recording it again later does not disturb waits already enqueued.
    """

    def __init__(self, device: torch.device, num_slots: int) -> None:
        self.device = torch.device(device)
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(device=self.device)
            self._ready = [torch.cuda.Event() for _ in range(num_slots)]
            self._free = [torch.cuda.Event() for _ in range(num_slots)]
        self._free_recorded = [False] * num_slots

    def copy(self, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        stream = self.stream
        if self._free_recorded[slot]:
            stream.wait_event(self._free[slot])
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        self._ready[slot].record(stream)

    def wait_ready(self, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self._ready[slot])

    def mark_free(self, slot: int) -> None:
        self._free[slot].record(torch.cuda.current_stream(self.device))
        self._free_recorded[slot] = True

    def synchronize(self) -> None:
        self.stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        self._ready = []
        self._free = []


class CheckingCopier(Copier):
    """A CPU stand-in for an asynchronous copy engine that catches ordering mistakes.

    An asynchronous copy may land any time between being issued and being waited on; the two
    ``mode``s take the two extremes:

    - ``"lazy"``: a copy is performed only when its slot is waited on, so a block that runs without
      ``wait_ready`` (or waits on the wrong slot) sees stale bytes;
    - ``"eager"``: a copy is performed at once, so a slot handed back too early (before the block
      that reads it has run) is overwritten under that block.

    In both modes a slot is "in use" from ``wait_ready`` until ``mark_free``, and a copy into a slot
    in use raises :class:`CopyOrderError`. ``poison`` fills each slot with 0xFF bytes (NaN for every
    float dtype) when first seen, so reading a never-filled slot cannot look right.
    """

    def __init__(self, mode: str = "lazy", poison: bool = True) -> None:
        if mode not in ("lazy", "eager"):
            raise ValueError(f"mode must be 'lazy' or 'eager', got {mode!r}")
        self.mode = mode
        self.poison = poison
        self.pending: dict[int, deque[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.in_use: set[int] = set()
        self.copies = 0
        self.applied = 0
        self._seen: set[int] = set()

    def copy(self, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        if slot in self.in_use:
            raise CopyOrderError(f"copy into slot {slot} while a block may still read it (no mark_free)")
        if self.poison and slot not in self._seen:
            self._seen.add(slot)
            base = dst._base if dst._base is not None else dst
            base.fill_(0xFF)
        self.copies += 1
        if self.mode == "eager":
            dst.copy_(src)
            self.applied += 1
            return
        self.pending.setdefault(slot, deque()).append((dst, src.clone()))

    def wait_ready(self, slot: int) -> None:
        queue = self.pending.get(slot)
        while queue:
            dst, src = queue.popleft()
            dst.copy_(src)
            self.applied += 1
        self.in_use.add(slot)

    def mark_free(self, slot: int) -> None:
        self.in_use.discard(slot)

    def synchronize(self) -> None:
        for slot in list(self.pending):
            queue = self.pending[slot]
            while queue:
                dst, src = queue.popleft()
                dst.copy_(src)
                self.applied += 1
