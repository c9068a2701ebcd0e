"""Readings the profiler takes: host RSS, the CUDA caching allocator's current and peak bytes,
pinned host memory, and host-to-device bytes moved by vramkit's block streaming engine.

Every reader is best effort and says when it cannot measure (``None``), never a made-up zero.
Nothing here initializes CUDA: a device reading is taken only once CUDA is initialized in this
process (before that, nothing can be allocated on the device, so the current value is truly 0).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("vramkit")

__all__ = ["RssMeter", "CudaMeter", "pinned_reader", "h2d_reader", "GpuReading"]


class RssMeter:
    """Resident set size of this process, from ``psutil``."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()

    def read(self) -> int:
        """Current RSS in bytes."""
        return int(self._process.memory_info().rss)


@dataclass(frozen=True)
class GpuReading:
    """Bytes the CUDA caching allocator reports: current and peak (since the last reset)."""

    allocated: int
    reserved: int
    peak_allocated: int
    peak_reserved: int


class CudaMeter:
    """Reads (and resets) the CUDA caching allocator's statistics of one device.

    ``device`` is a CUDA device index (``None``: the calling thread's current device). Nothing is read, and
    nothing is reset, while CUDA is not initialized in this process; readings are then all zero,
    which is exact (nothing can be allocated on the device before CUDA initializes).
    """

    def __init__(self, device: int | None, offset: int = 0) -> None:
        self.device = device
        # Bytes held on the device outside the profiled pipeline (see vramkit.memory.probe.vram_outside):
        # subtracted from every reading so the figures are the pipeline's own.
        self.offset = max(0, int(offset))

    def _index(self) -> int:
        return self.device if self.device is not None else torch.cuda.current_device()

    def read(self) -> GpuReading:
        """Current and peak allocated/reserved bytes (no synchronization).

        Reads the allocator's nested statistics (``torch.cuda.memory_stats_as_nested_dict``):
        ``torch.cuda.memory_stats`` flattens and sorts the same numbers, several times slower.
        """
        if not torch.cuda.is_initialized():
            return GpuReading(0, 0, 0, 0)
        stats = torch.cuda.memory_stats_as_nested_dict(self._index())
        allocated = stats.get("allocated_bytes", {}).get("all", {})
        reserved = stats.get("reserved_bytes", {}).get("all", {})
        off = self.offset
        return GpuReading(
            allocated=max(0, int(allocated.get("current", 0)) - off),
            reserved=max(0, int(reserved.get("current", 0)) - off),
            peak_allocated=max(0, int(allocated.get("peak", 0)) - off),
            peak_reserved=max(0, int(reserved.get("peak", 0)) - off),
        )

    def current(self) -> tuple[int, int]:
        """``(allocated, reserved)`` now; used by the sampler thread."""
        g = self.read()
        return g.allocated, g.reserved

    def reset_peak(self) -> None:
        """Start a new peak window (``torch.cuda.reset_peak_memory_stats``)."""
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats(self._index())

    def synchronize(self) -> None:
        """Wait for the device's queued work (only used with ``sync=True``)."""
        if torch.cuda.is_initialized():
            torch.cuda.synchronize(self._index())

    def name(self) -> str | None:
        """The device's name, if CUDA is already initialized (never initializes it)."""
        if not torch.cuda.is_initialized():
            return None
        return str(torch.cuda.get_device_name(self._index()))


def _streamers(modules: Iterable[torch.nn.Module]) -> list[Any]:
    """vramkit :class:`~vramkit.engine.BlockStreamer` objects active on these modules.

    The engine module is looked up in ``sys.modules`` only: if it was never imported, no module
    can carry a streamer, and the profiler imports nothing it does not need.
    """
    engine = sys.modules.get("vramkit.engine.streamer")
    streamer_of = getattr(engine, "streamer_of", None) if engine is not None else None
    if streamer_of is None:
        return []
    found = []
    for module in modules:
        streamer = streamer_of(module)
        if streamer is not None:
            found.append(streamer)
    return found


def h2d_reader(modules: Callable[[], Iterable[torch.nn.Module]]) -> Callable[[], int | None]:
    """A reader of the total host-to-device bytes vramkit's streaming engine has copied for the
    pipeline's modules (``stats.bytes_copied`` summed), or ``None`` when no module is streamed.

    ``modules`` is called at each reading, so streamers installed or removed mid-call (a re-plan
    after an out-of-memory error) are followed.
    """

    def read() -> int | None:
        streamers = _streamers(modules())
        if not streamers:
            return None
        total = 0
        for s in streamers:
            stats = getattr(s, "stats", None)
            total += int(getattr(stats, "bytes_copied", 0) or 0)
        return total

    return read


def pinned_reader(
    modules: Callable[[], Iterable[torch.nn.Module]],
) -> tuple[Callable[[], int | None], Callable[[], None]] | None:
    """``(read_peak, reset_peak)`` for pinned host memory, or ``None`` where it cannot be measured.

    The peak is that of PyTorch's caching host allocator (``torch.cuda.host_memory_stats()``,
    ``allocated_bytes.peak``: pinned blocks it owns, cached ones included) plus the bytes vramkit's
    streaming engine page-locked itself (``cudaHostRegister`` buffers, which that allocator does
    not see). Needs CUDA and a torch that has ``torch.cuda.host_memory_stats``.
    """
    nested_fn = getattr(torch.cuda, "host_memory_stats_as_nested_dict", None)
    flat_fn = getattr(torch.cuda, "host_memory_stats", None)
    if (nested_fn is None and flat_fn is None) or not torch.cuda.is_available():
        return None
    reset_fn = getattr(torch.cuda, "reset_peak_host_memory_stats", None)

    def allocator_peak() -> int:
        if nested_fn is not None:
            allocated = nested_fn().get("allocated_bytes", {})
            if isinstance(allocated, dict):
                return int(allocated.get("peak", allocated.get("current")) or 0)
        stats = flat_fn() if flat_fn is not None else {}
        return int(stats.get("allocated_bytes.peak", stats.get("allocated_bytes.current", 0)))

    def read_peak() -> int | None:
        engine_pinned = sum(
            int(getattr(s, "pinned_nbytes", 0) or 0) + int(getattr(s, "park_pinned_nbytes", 0) or 0)
            for s in _streamers(modules())
        )
        if not torch.cuda.is_initialized():
            return engine_pinned
        return allocator_peak() + engine_pinned

    def reset_peak() -> None:
        if reset_fn is not None and torch.cuda.is_initialized():
            reset_fn()

    return read_peak, reset_peak
