"""Host storage for packed blocks: one contiguous uint8 tensor per block, page-locked when possible
(:class:`HostBuffer`), or a view into a memory-mapped offload file (:class:`OffloadFile`).

Page-locking uses ``cudaHostRegister`` on an ordinary CPU allocation rather than
``torch.empty(..., pin_memory=True)``: PyTorch's caching host allocator rounds every pinned request
up to a power of two (a 680 MB FLUX double block would take 1 GiB) and keeps freed pinned memory in
its cache, so "released" pinned memory would not go back to the system. A registered buffer is
exactly its size and is unregistered on :meth:`HostBuffer.release`.
"""

from __future__ import annotations

import logging
import os
import uuid
import weakref
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import InvalidRequestError
from ..memory.probe import (
    OFFLOAD_SUFFIX,
    _holding,
    default_offload_folder,
    offload_host_tag,
    stale_offload_files,
)

__all__ = [
    "HostBuffer",
    "OffloadFile",
    "FileBlock",
    "PIN_METHODS",
    "default_offload_folder",
    "OFFLOAD_SUFFIX",
    "stale_offload_files",
    "remove_stale_offload_files",
]

logger = logging.getLogger(__name__)

#: ``"register"``: cudaHostRegister on a plain allocation (exact size, really freed);
#: ``"alloc"``: PyTorch's pinned allocator (rounds up to a power of two, cached after free);
#: ``"none"``: pageable.
PIN_METHODS = ("register", "alloc", "none")


_PAGE = 4096


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _cudart():  # type: ignore[no-untyped-def]
    return torch.cuda.cudart()


class HostBuffer:
    """``nbytes`` of host memory as a 1-D uint8 tensor, pinned if asked and possible.

    ``pinned`` says whether it ended up page-locked; a failed pin leaves it pageable (and logs).
    """

    def __init__(self, nbytes: int, pin: bool, method: str = "register") -> None:
        if method not in PIN_METHODS:
            raise ValueError(f"pin method must be one of {PIN_METHODS}, got {method!r}")
        self.nbytes = int(nbytes)
        self.pinned = False
        self._registered = False
        self._region = 0
        want = pin and method != "none" and self.nbytes > 0 and torch.cuda.is_available()
        if want and method == "alloc":
            try:
                self.tensor = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
                self.pinned = True
                return
            except RuntimeError as exc:
                logger.warning("pinning %d bytes failed (%s); this block stays in pageable memory", nbytes, exc)
        if not (want and method == "register"):
            self.tensor = torch.empty(self.nbytes, dtype=torch.uint8)
            return
        # Registration works on whole pages; give the buffer pages of its own (a page shared with
        # another allocation could be registered twice, which CUDA refuses).
        raw = torch.empty(self.nbytes + 2 * _PAGE, dtype=torch.uint8)
        start = (-raw.data_ptr()) % _PAGE
        self._region = _round_up(self.nbytes, _PAGE)
        self.tensor = raw[start : start + self.nbytes]
        self._register()

    def _register(self) -> None:
        cudart = _cudart()
        # Flag 0 = cudaHostRegisterDefault: page-locked and usable by async copies on this context.
        err = cudart.cudaHostRegister(self.tensor.data_ptr(), self._region, 0)
        if int(err) == 0:
            self.pinned = True
            self._registered = True
            return
        # The failed call leaves a (non-sticky) "last error" behind; clear it so the next kernel
        # launch check in PyTorch does not report it as its own failure.
        clear = getattr(cudart, "cudaGetLastError", None)
        if clear is not None:
            clear()
        logger.warning(
            "cudaHostRegister of %d bytes failed (error %d); this block stays in pageable memory",
            self.nbytes,
            int(err),
        )

    def release(self) -> None:
        """Unregister and drop the memory (safe to call twice). The caller must make sure no copy
        from it is still in flight (synchronize first)."""
        if self._registered:
            err = _cudart().cudaHostUnregister(self.tensor.data_ptr())
            if int(err) != 0:
                logger.warning("cudaHostUnregister failed (error %d)", int(err))
            self._registered = False
        self.pinned = False
        self.tensor = torch.empty(0, dtype=torch.uint8)
        self.nbytes = 0


class FileBlock:
    """One packed block inside a mapped :class:`OffloadFile`: the same interface as
    :class:`HostBuffer` (``tensor``, ``nbytes``, ``pinned``, ``release``). Never pinned."""

    pinned = False

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.nbytes = int(tensor.numel())

    def release(self) -> None:
        # The mapping belongs to the OffloadFile; dropping the view is all a block does.
        self.tensor = torch.empty(0, dtype=torch.uint8)
        self.nbytes = 0


class OffloadFile:
    """A file of packed blocks, written sequentially (one block in RAM at a time), then mapped.

    :meth:`append` writes a tensor's bytes at the next page-aligned offset and returns that offset;
    :meth:`map` closes the file for writing and maps it read-only-in-effect (a private mapping:
    ``torch.from_file(shared=False)``), so its pages are page cache the kernel can drop and re-read,
    not anonymous memory. :meth:`close` drops the mapping and deletes the file (and the folder, if
    this object created it and it is empty). Tensors still viewing the mapping keep it alive, but
    the file name is gone.

    The file is deleted even when nobody calls :meth:`close`: when this object is garbage-collected
    or the interpreter exits (a script that ends without ``vramkit.restore`` would otherwise leave
    tens of GB behind, and the next plan would find that much less free disk). A process that is
    killed cannot clean up, so the file is held under a shared ``flock`` for its lifetime: a file
    nobody holds is stale, and creating a new :class:`OffloadFile` deletes the stale ones in its
    folder (:func:`remove_stale_offload_files`).
    """

    def __init__(self, folder: str | os.PathLike[str], stem: str) -> None:
        self.folder = Path(folder)
        created: list[Path] = []
        probe = self.folder
        while not probe.exists():
            created.append(probe)
            probe = probe.parent
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidRequestError(
                f"cannot create the offload folder {self.folder} ({exc}); pass offload_folder= a writable "
                "directory on a local disk."
            ) from None
        self._created = list(reversed(created))
        remove_stale_offload_files(self.folder)
        # The host tag keeps another machine sharing this folder from judging the file (a flock
        # taken there may not be visible here).
        self.path = self.folder / f"{stem}-{offload_host_tag()}-{uuid.uuid4().hex[:12]}{OFFLOAD_SUFFIX}"
        try:
            lock_fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        except OSError as exc:
            raise InvalidRequestError(
                f"cannot write to the offload folder {self.folder} ({exc}); pass offload_folder= a writable "
                "directory on a local disk."
            ) from None
        _hold(lock_fd, self.path)
        _holding(self.path, True)
        # The writer gets its own descriptor of the same open file: closing it after writing keeps
        # the lock, which belongs to lock_fd until the file is deleted.
        self._fh: BinaryIO | None = os.fdopen(os.dup(lock_fd), "wb")
        # Reads (restore) go through this descriptor, not the name: the data stays readable even if
        # the name is deleted by hand while the pipeline still streams.
        self._fd = lock_fd
        self.size = 0
        self._mapping: torch.Tensor | None = None
        # Runs once: from close(), when this object is collected, or at interpreter exit.
        self._finalizer = weakref.finalize(
            self, _delete_offload_file, self.path, lock_fd, tuple(self._created), os.getpid()
        )

    @property
    def mapped(self) -> bool:
        return self._mapping is not None

    def append(self, data: torch.Tensor) -> int:
        """Write ``data``'s bytes (a CPU tensor, any dtype) at the next page boundary; its offset."""
        if self._fh is None:
            raise RuntimeError("OffloadFile.append after map()")
        pad = (-self.size) % _PAGE
        fh = self._fh
        if pad:
            fh.write(b"\0" * pad)
            self.size += pad
        offset = self.size
        flat = data.detach().reshape(-1).contiguous().view(torch.uint8)
        if flat.device.type != "cpu":
            flat = flat.cpu()
        fh.write(memoryview(flat.numpy()))
        self.size += flat.numel()
        return offset

    def map(self) -> torch.Tensor:
        """Finish writing and map the file; the whole file as a 1-D uint8 tensor."""
        if self._mapping is not None:
            return self._mapping
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.size == 0:
            self._mapping = torch.empty(0, dtype=torch.uint8)
        else:
            self._mapping = torch.from_file(str(self.path), shared=False, size=self.size, dtype=torch.uint8)
        return self._mapping

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.map()[offset : offset + nbytes]

    def read_into(self, offset: int, out: torch.Tensor) -> None:
        """Read ``out.nbytes`` bytes at ``offset`` into ``out`` (a contiguous tensor, any dtype or
        device) with plain reads, not through the mapping: the pages then stay page cache instead
        of counting in the process's RSS while it is mapped (a restore reads the whole file)."""
        if self._fh is not None:
            self._fh.flush()
        host = out if out.device.type == "cpu" else torch.empty(out.shape, dtype=out.dtype)
        flat = host.reshape(-1).view(torch.uint8)
        view = memoryview(flat.numpy())
        done = 0
        if hasattr(os, "preadv"):
            while done < len(view):
                got = os.preadv(self._fd, [view[done:]], offset + done)
                if not got:
                    break
                done += got
        else:  # Windows has no positional read: seek on a duplicate of the held descriptor
            with os.fdopen(os.dup(self._fd), "rb") as fh:
                fh.seek(offset)
                while done < len(view):
                    got = fh.readinto(view[done:])
                    if not got:
                        break
                    done += got
        if done < len(view):
            raise OSError(f"offload file {self.path} ends at {offset + done}, {len(view) - done} bytes early")
        if host is not out:
            out.copy_(host)

    def close(self) -> None:
        """Drop the mapping, delete the file (and the folders this object created, when empty).
        Safe to call twice."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._mapping = None
        self._finalizer()


def _hold(fd: int, path: Path) -> None:
    """Take a shared ``flock`` on ``fd`` for as long as it is open: the mark that the file is in use
    (see :func:`stale_offload_files`). Without ``flock`` (Windows) or where it is refused (some
    network file systems) the file is simply never called stale."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        logger.debug("no flock on %s (%s): it will not be recognised as in use", path, exc)


def _delete_offload_file(path: Path, lock_fd: int, created: tuple[Path, ...], owner_pid: int) -> None:
    # A module-level function: a finalizer must not hold a reference to the object it finalizes.
    if os.getpid() != owner_pid:
        return  # a forked child exiting: the file belongs to the parent, which still uses it
    # The lock goes first: Windows cannot delete a file that is open (POSIX does not mind).
    try:
        os.close(lock_fd)
    except OSError:
        pass
    _holding(path, False)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not delete the offload file %s (%s); delete it by hand", path, exc)
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            break  # not empty (another streamer's file) or gone: leave it


def remove_stale_offload_files(folder: str | os.PathLike[str] | None = None) -> int:
    """Delete :func:`stale_offload_files` in ``folder``; the number of bytes freed."""
    freed = 0
    for path in stale_offload_files(folder):
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue  # another process removed it first
        except OSError as exc:
            logger.warning("could not delete the stale offload file %s (%s); delete it by hand", path, exc)
            continue
        freed += size
        logger.info(
            "deleted a stale offload file %s (%.2f GB) left by a process that did not exit cleanly", path, size / 1e9
        )
    return freed
