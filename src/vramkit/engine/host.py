"""Host buffers for packed blocks: one contiguous uint8 tensor per block, page-locked when possible.

Page-locking uses ``cudaHostRegister`` on an ordinary CPU allocation rather than
``torch.empty(..., pin_memory=True)``: PyTorch's caching host allocator rounds every pinned request
up to a power of two (a 680 MB FLUX double block would take 1 GiB) and keeps freed pinned memory in
its cache, so "released" pinned memory would not go back to the system. A registered buffer is
exactly its size and is unregistered on :meth:`HostBuffer.release`.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["HostBuffer", "PIN_METHODS"]

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
