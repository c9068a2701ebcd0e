"""The block streaming engine: keep some of a model's repeated blocks on the GPU and stream the
others from (pinned) host memory just ahead of use, at the host-to-device transfer limit.

Layers, from pure data to CUDA:

- :mod:`~vramkit.engine.blocks`: find the block stacks, choose the resident blocks;
- :mod:`~vramkit.engine.layout`: :class:`StreamingLayout` (offsets, sizes, slots, pinned split)
  and packing/unpacking, computed from shapes only;
- :mod:`~vramkit.engine.codec`: raw / cast / fp8 / int8 storage and the decode kernels;
- :mod:`~vramkit.engine.scheduler`: the ring of slots and the prefetch order;
- :mod:`~vramkit.engine.copier`: CUDA side-stream copies with events, or CPU stand-ins;
- :mod:`~vramkit.engine.streamer`: :class:`BlockStreamer`, which wires it all into the module with
  diffusers hooks and restores it exactly.
"""

from __future__ import annotations

from .blocks import choose_resident, execution_order, find_block_stacks
from .codec import decode_into, dequantize_rows, quantize_rows
from .copier import CheckingCopier, Copier, CopyOrderError, CudaStreamCopier, SyncCopier
from .host import HostBuffer
from .layout import (
    ALIGNMENT,
    STORAGES,
    BlockLayout,
    StreamingLayout,
    TensorEntry,
    compute_layout,
    decoded_views,
    layout_from_blocks,
    pack_block,
    packed_blocks,
    stored_views,
    unpack_block,
)
from .planning import max_resident_for_budget
from .scheduler import RingScheduler, StreamingStats
from .streamer import BlockStreamer, enable_block_streaming, streamer_of

__all__ = [
    "ALIGNMENT",
    "STORAGES",
    "BlockLayout",
    "BlockStreamer",
    "CheckingCopier",
    "Copier",
    "CopyOrderError",
    "CudaStreamCopier",
    "HostBuffer",
    "RingScheduler",
    "StreamingLayout",
    "StreamingStats",
    "SyncCopier",
    "TensorEntry",
    "choose_resident",
    "compute_layout",
    "decode_into",
    "decoded_views",
    "dequantize_rows",
    "enable_block_streaming",
    "execution_order",
    "find_block_stacks",
    "layout_from_blocks",
    "max_resident_for_budget",
    "pack_block",
    "packed_blocks",
    "quantize_rows",
    "stored_views",
    "streamer_of",
    "unpack_block",
]
