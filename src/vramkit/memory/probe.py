"""What the machine offers: device memory (total and free), host RAM (with container limits),
a safe pinned-memory limit and the pinned host-to-device bandwidth.

Nothing is probed at import time. The bandwidth is measured once per device name (a 256 MiB pinned
copy, a few hundred milliseconds) and cached on disk under the user cache directory
(``$VRAMKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/vramkit``, else ``~/.cache/vramkit``) in
``bandwidth.json``; without a GPU, or when not measured, a stated default of 25 GB/s is used and
labelled as assumed.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DeviceProbe",
    "probe",
    "host_memory",
    "measure_h2d_bandwidth",
    "cache_dir",
    "default_offload_folder",
    "offload_free_bytes",
    "existing_ancestor",
    "files_nbytes",
    "stale_offload_files",
    "offload_host_tag",
    "OFFLOAD_SUFFIX",
    "ASSUMED_BANDWIDTH",
    "PINNED_FRACTION",
]

logger = logging.getLogger("vramkit")

#: Host-to-device bandwidth used when none was measured (a PCIe 4.0 x16 link's practical rate).
ASSUMED_BANDWIDTH = 25e9
#: Share of the available host RAM considered safe to page-lock.
PINNED_FRACTION = 0.55
_MEASURE_BYTES = 256 * 1024**2
# Copy load before timing, so the PCIe link has left its idle power state (see measure_h2d_bandwidth).
_WARMUP_SECONDS = 0.3


@dataclass(frozen=True)
class DeviceProbe:
    """A snapshot of the device and the host, in bytes (bandwidth in bytes/s).

    ``free_vram`` counts memory torch's caching allocator holds but does not use as free.
    ``ram_available`` is the smaller of what the OS reports available and the container (cgroup)
    limit minus its usage. ``bandwidth_source`` is ``"measured"``, ``"cached"`` or ``"assumed"``.
    ``offload_free``: free bytes on the disk of the default offload folder
    (:func:`default_offload_folder`), where streamed blocks and kept originals are written; ``None``
    when unknown.
    """

    device: str
    name: str
    total_vram: int
    free_vram: int
    ram_total: int
    ram_available: int
    pinned_limit: int
    h2d_bandwidth: float
    bandwidth_source: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    offload_free: int | None = None

    @property
    def is_gpu(self) -> bool:
        return self.device.split(":")[0] in ("cuda", "mps", "xpu") and self.total_vram > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "name": self.name,
            "total_vram": int(self.total_vram),
            "free_vram": int(self.free_vram),
            "ram_total": int(self.ram_total),
            "ram_available": int(self.ram_available),
            "pinned_limit": int(self.pinned_limit),
            "h2d_bandwidth": float(self.h2d_bandwidth),
            "bandwidth_source": self.bandwidth_source,
            "offload_free": None if self.offload_free is None else int(self.offload_free),
            "notes": list(self.notes),
        }


def cache_dir() -> Path:
    """The per-user cache directory of vramkit (not created here)."""
    override = os.environ.get("VRAMKIT_CACHE_DIR")
    if override:
        return Path(override)
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "vramkit" / "Cache"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vramkit"


def default_offload_folder() -> Path:
    """Where streamed blocks go when ``host="disk"`` (and kept originals with ``originals="disk"``)
    and no folder is given: ``$VRAMKIT_OFFLOAD_DIR``, else ``offload/`` in vramkit's cache directory.
    Not the system temp directory: ``/tmp`` is often a tmpfs, i.e. RAM, which would defeat the
    purpose."""
    override = os.environ.get("VRAMKIT_OFFLOAD_DIR")
    if override:
        return Path(override)
    return cache_dir() / "offload"


#: Suffix of the offload files vramkit writes (so a stray one is easy to recognise and delete).
OFFLOAD_SUFFIX = ".vramkit-offload"
#: An offload file written to this recently is never called stale (see :func:`stale_offload_files`).
_STALE_AFTER_S = 60.0


#: Offload files this process holds. They are never probed: where flock is emulated with fcntl
#: locks (NFS), a lock belongs to the process, so this process could take its own file's lock
#: "exclusively", and closing the probe's descriptor would drop the lock the file is held by.
_HELD_HERE: set[str] = set()


def _holding(path: Path, held: bool) -> None:
    """Record (``held=True``) or forget an offload file this process holds (used by the engine)."""
    if held:
        _HELD_HERE.add(str(path))
    else:
        _HELD_HERE.discard(str(path))


def offload_host_tag() -> str:
    """This machine's tag in offload file names (``<stem>-<tag>-<random><suffix>``): only files with
    this tag are ever judged stale here. A flock taken on one machine may be invisible on another
    that shares the folder (NFS with local locks, BeeGFS, Lustre ``localflock``)."""
    name = platform.node() or "host"
    return "".join(ch if ch.isalnum() else "_" for ch in name)[:40]


def stale_offload_files(folder: str | os.PathLike[str] | None = None) -> list[Path]:
    """The offload files of this machine in ``folder`` (default :func:`default_offload_folder`)
    that no live process holds: left behind by a process that was killed before it could delete
    them. A file is in use while its writer holds a shared ``flock`` on it; a file of this host
    (:func:`offload_host_tag`) whose lock this process can take exclusively, that it could delete
    (the folder is writable) and that was not written to in the last minute, is stale. Empty where
    ``flock`` is unavailable (nothing can be proven stale)."""
    try:
        import fcntl
    except ImportError:
        return []
    root = Path(folder) if folder is not None else default_offload_folder()
    if not os.access(root, os.W_OK):
        return []  # nothing here could be deleted, so nothing counts as reclaimable
    try:
        candidates = sorted(root.glob(f"*-{offload_host_tag()}-*{OFFLOAD_SUFFIX}"))
    except OSError:
        return []
    stale: list[Path] = []
    now = time.time()
    for path in candidates:
        if str(path) in _HELD_HERE:
            continue
        try:
            if now - path.stat().st_mtime < _STALE_AFTER_S:
                continue  # just created: its writer may not hold the lock yet
            # Read-write: an exclusive lock needs it where flock is emulated with fcntl (NFS), and a
            # file this process cannot write is not its to delete.
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: in use by a live process (this one or another)
        else:
            stale.append(path)
        finally:
            os.close(fd)  # closing drops the probe's lock too
    return stale


def existing_ancestor(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute, or its nearest parent that exists (a folder not created yet is on
    the disk of that parent)."""
    found = Path(path).absolute()
    while not found.exists() and found != found.parent:
        found = found.parent
    return found


def files_nbytes(paths: Iterable[str | os.PathLike[str]]) -> int:
    """Total size of the files that still exist among ``paths``."""
    total = 0
    for path in paths:
        try:
            total += os.stat(path).st_size
        except OSError:
            continue
    return total


def offload_free_bytes(folder: str | os.PathLike[str] | None = None) -> int | None:
    """Free bytes on the disk that holds ``folder`` (default :func:`default_offload_folder`), read
    at its nearest existing parent (the folder is created only when something is written); ``None``
    when it cannot be read."""
    folder_path = (Path(folder) if folder is not None else default_offload_folder()).absolute()
    probe_at = existing_ancestor(folder_path)
    try:
        free = int(shutil.disk_usage(probe_at).free)
    except OSError as exc:
        logger.debug("free space of the offload folder %s not readable: %s", probe_at, exc)
        return None
    # Files left by a killed process are deleted before the next one is written: count them as free.
    stale = files_nbytes(stale_offload_files(folder_path))
    if stale:
        logger.info(
            "%.2f GB of stale offload files in %s count as free: they are deleted before vramkit writes the next one",
            stale / 1e9,
            folder_path,
        )
    return free + stale


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _cgroup_available() -> tuple[int | None, str | None]:
    """Limit minus usage (less reclaimable page cache) of this process's memory cgroup, if limited."""
    root = Path("/sys/fs/cgroup")
    # cgroup v2: the process's own group, else the root of the namespace.
    rel = None
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[0] == "0":
                rel = parts[2].lstrip("/")
    except OSError:
        pass
    v2_dirs = [root / rel] if rel else []
    v2_dirs.append(root)
    for d in v2_dirs:
        limit = _read_int(d / "memory.max")
        if limit is None:
            continue
        usage = _read_int(d / "memory.current") or 0
        inactive = _stat_value(d / "memory.stat", "inactive_file")
        return max(0, limit - max(0, usage - inactive)), f"cgroup v2 limit {limit} bytes"
    v1 = root / "memory"
    limit = _read_int(v1 / "memory.limit_in_bytes")
    if limit is not None and limit < (1 << 60):
        usage = _read_int(v1 / "memory.usage_in_bytes") or 0
        inactive = _stat_value(v1 / "memory.stat", "total_inactive_file")
        return max(0, limit - max(0, usage - inactive)), f"cgroup v1 limit {limit} bytes"
    return None, None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def host_memory() -> tuple[int, int, list[str]]:
    """``(total, available, notes)`` of host RAM, honouring a container memory limit."""
    import psutil

    vm = psutil.virtual_memory()
    total, available = int(vm.total), int(vm.available)
    notes: list[str] = []
    cg_available, cg_note = _cgroup_available()
    if cg_available is not None and cg_available < available:
        notes.append(f"host RAM limited by the container ({cg_note})")
        available = cg_available
    return total, available, notes


def _bandwidth_cache_file() -> Path:
    return cache_dir() / "bandwidth.json"


def _read_cached_bandwidth(name: str) -> float | None:
    try:
        data = json.loads(_bandwidth_cache_file().read_text())
        value = float(data[name]["h2d_bandwidth"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if value > 0 else None


def _write_cached_bandwidth(name: str, value: float) -> None:
    path = _bandwidth_cache_file()
    try:
        data: dict[str, Any] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except ValueError:
                data = {}
        data[name] = {"h2d_bandwidth": value, "measured_at": time.time(), "torch": torch.__version__}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:
        logger.debug("could not cache the bandwidth in %s: %s", path, exc)


def measure_h2d_bandwidth(device: str | torch.device = "cuda", nbytes: int = _MEASURE_BYTES, repeats: int = 8) -> float:
    """Pinned host-to-device copy rate in bytes/s (best of ``repeats`` copies of ``nbytes``).

    Copies run for at least ``_WARMUP_SECONDS`` first: an idle GPU keeps its PCIe link at a lower
    generation to save power and retrains it only under load, so a cold measurement can read half
    the rate the streaming engine then gets (seen on an H100: 31 GB/s cold, 55 GB/s warm)."""
    dev = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    best = float("inf")
    try:
        warm_until = time.perf_counter() + _WARMUP_SECONDS
        while True:
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(dev)
            if time.perf_counter() >= warm_until:
                break
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000.0)
    finally:
        del src, dst
    return nbytes / best


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def probe(
    device: str | torch.device | None = None, *, measure_bandwidth: bool = True, use_cache: bool = True
) -> DeviceProbe:
    """Probe ``device`` (default: the current CUDA device, else MPS, else the CPU) and the host.

    ``measure_bandwidth=False`` never runs the copy (the cached value, else the assumed default);
    ``use_cache=False`` ignores and overwrites the cached bandwidth.
    """
    dev = _resolve_device(device)
    ram_total, ram_available, notes = host_memory()
    pinned_limit = int(ram_available * PINNED_FRACTION)
    notes.append(f"pinned limit = {PINNED_FRACTION:.0%} of available host RAM")
    bandwidth, source = ASSUMED_BANDWIDTH, "assumed"
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(dev)
        name = str(props.name)
        free, total = torch.cuda.mem_get_info(dev)
        cached_unused = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        free_vram = int(free + max(0, cached_unused))
        if cached_unused > 0:
            notes.append(f"free VRAM counts {cached_unused} bytes torch has cached but not in use")
        total_vram = int(total)
        cached = _read_cached_bandwidth(name) if use_cache else None
        if cached is not None:
            bandwidth, source = cached, "cached"
        elif measure_bandwidth:
            try:
                bandwidth, source = measure_h2d_bandwidth(dev), "measured"
                _write_cached_bandwidth(name, bandwidth)
            except RuntimeError as exc:  # out of memory, no pinned memory
                notes.append(f"bandwidth not measured ({exc}); assumed {ASSUMED_BANDWIDTH / 1e9:.0f} GB/s")
    elif dev.type == "mps":
        name = "Apple MPS"
        total_vram = int(getattr(torch.mps, "recommended_max_memory", lambda: 0)())
        used = int(getattr(torch.mps, "driver_allocated_memory", lambda: 0)())
        free_vram = max(0, total_vram - used)
        notes.append("MPS: total is the recommended max working set; memory is shared with the host")
        notes.append("MPS: no separate host-to-device copy; bandwidth is nominal")
    else:
        name = "CPU (no GPU)"
        total_vram = free_vram = 0
        notes.append("no GPU found: nothing to plan on the GPU unless a vram budget is given")
    if source == "assumed":
        notes.append(f"h2d bandwidth {ASSUMED_BANDWIDTH / 1e9:.0f} GB/s is assumed, not measured")
    offload_free = offload_free_bytes()
    return DeviceProbe(
        device=str(dev),
        name=name,
        total_vram=total_vram,
        free_vram=free_vram,
        ram_total=ram_total,
        ram_available=ram_available,
        pinned_limit=pinned_limit,
        h2d_bandwidth=float(bandwidth),
        bandwidth_source=source,
        notes=tuple(notes),
        offload_free=offload_free,
    )


def vram_outside(modules: Iterable[torch.nn.Module], device: str | torch.device | None) -> int | None:
    """Bytes the CUDA caching allocator has handed out on ``device`` to anything but ``modules``'
    parameters and buffers (other models, caches, a ballast that simulates a smaller card); ``None``
    when ``device`` is not an initialized CUDA device.

    The planner's budget is the memory free when it plans, so this memory is not the plan's: the
    profiler subtracts it from its readings to compare them with the plan's predictions.
    """
    if device is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    seen: set[int] = set()
    own = 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            if t.device.type == "cuda" and (t.device.index or 0) == index and id(t) not in seen:
                seen.add(id(t))
                own += t.numel() * t.element_size()
    return max(0, torch.cuda.memory_allocated(index) - own)
