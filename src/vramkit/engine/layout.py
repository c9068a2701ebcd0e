"""The streaming layout: pure data describing what goes where, computed from shapes and dtypes only.

Nothing here touches a GPU, so the planner can compute a layout from a model built on the meta
device, and CPU tests can check every offset. A :class:`StreamingLayout` says, for one model:

- which blocks are resident and which are streamed (:func:`~vramkit.engine.blocks.choose_resident`:
  each stack streams bytes in proportion to its compute, spread evenly within the stack);
- for every block, where each of its tensors sits in the block's one contiguous packed buffer
  (offsets aligned to :data:`ALIGNMENT` bytes, so every tensor can be viewed in its own dtype and
  copy kernels get aligned addresses), and how it is stored (``raw``, ``cast``, ``fp8``, ``int8``);
- how big the ring slots (largest streamed block) and the decode scratch are;
- which streamed blocks' host buffers are pinned and which stay pageable under a ``pinned_limit``.

:func:`pack_block` writes a block's tensors into a buffer following the layout, and
:func:`decoded_views` / :func:`unpack_block` give them back, bit-identical for ``raw``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InvalidRequestError, UnsupportedPipelineError
from . import codec as _codec
from .blocks import check_unit, choose_resident, find_block_stacks, module_tensors, streaming_units

__all__ = [
    "ALIGNMENT",
    "STORAGES",
    "TensorEntry",
    "BlockLayout",
    "StreamingLayout",
    "block_entries",
    "compute_layout",
    "layout_from_blocks",
    "pack_block",
    "stored_views",
    "decoded_views",
    "decode_block",
    "unpack_block",
    "block_tensor_map",
]

#: Byte alignment of every tensor in a packed buffer and in the decode scratch.
ALIGNMENT = 256

#: Valid ``storage`` values: ``None`` (as loaded), a 16-bit float, or a lossy 8-bit code.
STORAGES: tuple[str | None, ...] = (None, "bf16", "fp16", "fp8", "int8")
_STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp32 elements quantized at once when packing (8 Mi elements = 32 MiB per temporary).
_QUANT_CHUNK_ELEMENTS = 1 << 23


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a block in its packed buffer.

    ``name`` is the dotted name inside the block (``"attn.to_q.weight"``); ``aliases`` lists other
    names of the same tensor object. ``offset``/``nbytes`` locate the stored data; fp8/int8 entries
    also have fp32 per-row scales at ``scale_offset``. ``scratch_offset`` is where the decoded tensor
    lives in the decode scratch (``-1`` when the block is not decoded: its tensors are views into the
    packed buffer itself).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    codec: str
    stored_dtype: torch.dtype
    offset: int
    nbytes: int
    scale_offset: int = -1
    scale_nbytes: int = 0
    scratch_offset: int = -1
    aliases: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def decoded_nbytes(self) -> int:
        """Bytes of the tensor in its compute dtype."""
        return self.numel * self.dtype.itemsize

    @property
    def lossless(self) -> bool:
        return self.codec == "raw"


@dataclass(frozen=True)
class BlockLayout:
    """One block: where it sits in the model, whether it is resident, and its packed tensors.

    ``nbytes`` is the packed buffer size (the bytes copied per stream-in); ``original_nbytes`` the
    block's bytes as loaded; ``scratch_nbytes`` the decode scratch it needs (0 for raw blocks).
    ``pinned`` is meaningful for streamed blocks only.

    With ``unit="part"`` a "block" here is one streaming unit: ``part`` names the child of block
    ``stack[index]`` it is (``"attn"``; entry names are then relative to that child), ``""`` for a
    whole block.
    """

    stack: str
    index: int
    position: int
    resident: bool
    entries: tuple[TensorEntry, ...]
    nbytes: int
    original_nbytes: int
    scratch_nbytes: int
    pinned: bool = False
    part: str = ""

    @property
    def encoded(self) -> bool:
        """True when some tensor is not stored raw: the block is decoded into the scratch per run."""
        return any(e.codec != "raw" for e in self.entries)

    @property
    def device_nbytes(self) -> int:
        """GPU bytes this block takes while resident (packed if encoded, else as loaded)."""
        return self.nbytes if self.encoded else self.original_nbytes


@dataclass(frozen=True)
class StreamingLayout:
    """Everything the engine needs to know before touching memory (see the module docstring)."""

    stacks: tuple[tuple[str, int], ...]
    blocks: tuple[BlockLayout, ...]
    prefetch: int
    storage: str | None
    alignment: int
    num_slots: int
    slot_nbytes: int
    scratch_nbytes: int
    rest_nbytes: int
    pinned_limit: int | None = None
    notes: tuple[str, ...] = field(default=())
    unit: str = "block"

    @property
    def resident_positions(self) -> tuple[int, ...]:
        return tuple(b.position for b in self.blocks if b.resident)

    @property
    def streamed_positions(self) -> tuple[int, ...]:
        return tuple(b.position for b in self.blocks if not b.resident)

    @property
    def resident_nbytes(self) -> int:
        """GPU bytes of the resident blocks."""
        return sum(b.device_nbytes for b in self.blocks if b.resident)

    @property
    def streamed_nbytes(self) -> int:
        """Bytes copied host-to-device per full pass over the blocks (one forward)."""
        return sum(b.nbytes for b in self.blocks if not b.resident)

    @property
    def pinned_nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks if not b.resident and b.pinned)

    @property
    def pageable_nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks if not b.resident and not b.pinned)

    @property
    def ring_nbytes(self) -> int:
        return self.num_slots * self.slot_nbytes

    @property
    def device_nbytes(self) -> int:
        """GPU bytes the weights take: the rest + resident blocks + ring slots + decode scratch
        (activations not included)."""
        return self.rest_nbytes + self.resident_nbytes + self.ring_nbytes + self.scratch_nbytes

    @property
    def original_nbytes(self) -> int:
        """Bytes of the model as loaded (the rest + every block)."""
        return self.rest_nbytes + sum(b.original_nbytes for b in self.blocks)

    @property
    def lossless(self) -> bool:
        return all(e.lossless for b in self.blocks for e in b.entries)

    @property
    def retained_nbytes(self) -> int:
        """Host bytes kept for an exact restore: the original values of encoded tensors."""
        return sum(e.numel * e.dtype.itemsize for b in self.blocks for e in b.entries if e.codec != "raw")

    def summary(self) -> dict[str, Any]:
        """JSON-safe figures for benchmarks, plans and logs."""
        return {
            "stacks": [list(s) for s in self.stacks],
            "num_blocks": len(self.blocks),
            "unit": self.unit,
            "resident_positions": list(self.resident_positions),
            "streamed_positions": list(self.streamed_positions),
            "prefetch": self.prefetch,
            "storage": self.storage,
            "num_slots": self.num_slots,
            "slot_nbytes": self.slot_nbytes,
            "scratch_nbytes": self.scratch_nbytes,
            "rest_nbytes": self.rest_nbytes,
            "resident_nbytes": self.resident_nbytes,
            "streamed_nbytes": self.streamed_nbytes,
            "pinned_nbytes": self.pinned_nbytes,
            "pageable_nbytes": self.pageable_nbytes,
            "device_nbytes": self.device_nbytes,
            "original_nbytes": self.original_nbytes,
            "retained_nbytes": self.retained_nbytes,
            "notes": list(self.notes),
        }


def block_tensor_map(
    block: nn.Module,
) -> dict[str, tuple[str, torch.Tensor, list[tuple[nn.Module, str, str]]]]:
    """A block's tensors by primary dotted name: ``name -> (kind, tensor, [(owner, attr, name), ...])``.

    A tensor object registered under several names appears once, with every owner listed (the
    first is the primary name).
    """
    by_id: dict[int, str] = {}
    out: dict[str, tuple[str, torch.Tensor, list[tuple[nn.Module, str, str]]]] = {}
    prefixes = {id(m): n for n, m in block.named_modules()}
    for owner, attr, kind, tensor in module_tensors(block):
        prefix = prefixes[id(owner)]
        name = f"{prefix}.{attr}" if prefix else attr
        key = id(tensor)
        if key in by_id:
            out[by_id[key]][2].append((owner, attr, name))
            continue
        by_id[key] = name
        out[name] = (kind, tensor, [(owner, attr, name)])
    return out


def _linear_weight_ids(block: nn.Module) -> set[int]:
    return {id(m.weight) for m in block.modules() if isinstance(m, nn.Linear) and m.weight is not None}


def _choose_codec(tensor: torch.Tensor, is_linear_weight: bool, storage: str | None) -> str:
    if storage is None or not tensor.dtype.is_floating_point:
        return "raw"
    if storage in ("fp8", "int8"):
        return storage if is_linear_weight and tensor.dim() == 2 else "raw"
    target = _STORAGE_DTYPES[storage]
    # 16-bit storage narrows wider floats only; converting bf16 <-> fp16 saves no bytes.
    return "cast" if tensor.dtype.itemsize > target.itemsize else "raw"


def block_entries(
    block: nn.Module, storage: str | None = None, alignment: int = ALIGNMENT
) -> tuple[tuple[TensorEntry, ...], int, int, int]:
    """Pack one block: ``(entries, packed nbytes, original nbytes, scratch nbytes)``.

    Works on meta tensors (only shapes and dtypes are read). Encoded blocks (any non-raw entry) get
    a scratch offset for *every* entry, so all their tensors live in the scratch and the packed
    buffer is free again as soon as the block is decoded.
    """
    tensors = block_tensor_map(block)
    linear_ids = _linear_weight_ids(block)
    storage_dtype = _STORAGE_DTYPES.get(storage or "")
    codecs = {name: _choose_codec(t, id(t) in linear_ids, storage) for name, (_, t, _) in tensors.items()}
    encoded = any(c != "raw" for c in codecs.values())
    entries: list[TensorEntry] = []
    offset = 0
    scratch = 0
    original = 0
    for name, (kind, tensor, owners) in tensors.items():
        codec = codecs[name]
        shape = tuple(int(s) for s in tensor.shape)
        numel = math.prod(shape)
        stored = _codec.stored_dtype_for(codec, tensor.dtype, storage_dtype)
        nbytes = numel * stored.itemsize
        original += numel * tensor.dtype.itemsize
        offset = _align(offset, alignment)
        data_offset = offset
        offset += nbytes
        scale_offset, scale_nbytes = -1, 0
        if codec in ("fp8", "int8"):
            offset = _align(offset, alignment)
            scale_offset, scale_nbytes = offset, shape[0] * _codec.SCALE_DTYPE.itemsize
            offset += scale_nbytes
        scratch_offset = -1
        if encoded:
            scratch = _align(scratch, alignment)
            scratch_offset = scratch
            scratch += numel * tensor.dtype.itemsize
        aliases = tuple(alias for _, _, alias in owners[1:])
        entries.append(
            TensorEntry(
                name=name,
                kind=kind,
                shape=shape,
                dtype=tensor.dtype,
                codec=codec,
                stored_dtype=stored,
                offset=data_offset,
                nbytes=nbytes,
                scale_offset=scale_offset,
                scale_nbytes=scale_nbytes,
                scratch_offset=scratch_offset,
                aliases=aliases,
            )
        )
    return tuple(entries), _align(offset, alignment), original, _align(scratch, alignment)


def _check_storage(storage: str | None) -> None:
    if storage not in STORAGES:
        raise InvalidRequestError(f"storage={storage!r}: use one of {STORAGES}.")


def layout_from_blocks(
    stacks: tuple[tuple[str, int], ...],
    packed: list[tuple[str, int, tuple[TensorEntry, ...], int, int, int]],
    rest_nbytes: int,
    resident: int | Collection[int],
    prefetch: int = 1,
    storage: str | None = None,
    pinned_limit: int | None = None,
    alignment: int = ALIGNMENT,
    unit: str = "block",
) -> StreamingLayout:
    """Assemble a layout from already packed blocks (cheap: the planner can try many ``resident``).

    ``packed`` holds ``(stack, index, entries, nbytes, original_nbytes, scratch_nbytes)`` per block in
    execution order (with ``unit="part"``, a seventh item: the part name, see :func:`packed_blocks`);
    ``resident`` is a count or explicit positions (of units). A count is placed by
    :func:`choose_resident` with each block's stack, so the streamed bytes of each stack follow its
    compute (the planner and the engine both come here, so they agree on the memory).
    Streamed blocks are pinned greedily in execution order while the pinned total stays within
    ``pinned_limit``; the others stay pageable (and are noted).
    """
    check_unit(unit)
    n = len(packed)
    if isinstance(resident, int) and not isinstance(resident, bool):
        resident_set = choose_resident(n, resident, [stack for stack, *_ in packed])
    else:
        resident_set = {int(p) for p in resident}
        bad = [p for p in resident_set if not 0 <= p < n]
        if bad:
            raise InvalidRequestError(f"resident positions {sorted(bad)} are outside 0..{n - 1}.")
    if prefetch < 1:
        raise InvalidRequestError(f"prefetch={prefetch}: must be at least 1.")
    notes: list[str] = []
    pinned_total = 0
    blocks: list[BlockLayout] = []
    for pos, (stack, index, entries, nbytes, original, scratch, *part) in enumerate(packed):
        is_resident = pos in resident_set
        pinned = False
        if not is_resident:
            if pinned_limit is None or pinned_total + nbytes <= pinned_limit:
                pinned = True
                pinned_total += nbytes
        blocks.append(
            BlockLayout(
                stack=stack,
                index=index,
                position=pos,
                resident=is_resident,
                entries=entries,
                nbytes=nbytes,
                original_nbytes=original,
                scratch_nbytes=scratch,
                pinned=pinned,
                part=str(part[0]) if part else "",
            )
        )
    streamed = [b for b in blocks if not b.resident]
    num_slots = min(prefetch + 1, len(streamed))
    slot_nbytes = max((b.nbytes for b in streamed), default=0)
    scratch_nbytes = max((b.scratch_nbytes for b in blocks if b.encoded), default=0)
    pageable = [b.position for b in streamed if not b.pinned]
    if pageable:
        notes.append(
            f"{len(pageable)} streamed block(s) stay in pageable host memory (pinned_limit="
            f"{pinned_limit} bytes): their copies run at pageable speed and block the host"
        )
    return StreamingLayout(
        stacks=stacks,
        blocks=tuple(blocks),
        prefetch=prefetch,
        storage=storage,
        alignment=alignment,
        num_slots=num_slots,
        slot_nbytes=slot_nbytes,
        scratch_nbytes=scratch_nbytes,
        rest_nbytes=rest_nbytes,
        pinned_limit=pinned_limit,
        notes=tuple(notes),
        unit=unit,
    )


def packed_blocks(
    module: nn.Module,
    storage: str | None = None,
    alignment: int = ALIGNMENT,
    stacks: list[tuple[str, nn.ModuleList]] | None = None,
    unit: str = "block",
) -> tuple[tuple[tuple[str, int], ...], list[tuple[Any, ...]], int]:
    """Pack every block of ``module`` (shapes only): ``(stacks, packed blocks, rest nbytes)``.

    Each packed block is ``(stack, index, entries, nbytes, original_nbytes, scratch_nbytes)``. With
    ``unit="part"`` the packed units are the blocks' parts in call order
    (:func:`~vramkit.engine.blocks.streaming_units`), each with its part name as a seventh item
    (``""`` for a block streamed whole); ``stacks`` still counts blocks.

    Raises :class:`UnsupportedPipelineError` when ``module`` has no known block stack, or when a tensor
    is shared between two blocks or between a block and the rest (streaming would overwrite it).
    """
    _check_storage(storage)
    check_unit(unit)
    if alignment <= 0 or alignment & (alignment - 1):
        raise InvalidRequestError(f"alignment={alignment}: must be a power of two.")
    stacks = find_block_stacks(module) if stacks is None else stacks
    if not stacks:
        raise UnsupportedPipelineError(
            f"{type(module).__name__} has no repeated-block stack vramkit can stream "
            "(FluxTransformer2DModel, FluxControlNetModel and T5EncoderModel are supported)."
        )
    owner_of: dict[int, str] = {}
    packed = []
    for stack, index, part, block in streaming_units(stacks, unit):
        where = f"{stack}.{index}.{part}" if part else f"{stack}.{index}"
        for _, _, _, t in module_tensors(block):
            prev = owner_of.setdefault(id(t), where)
            if prev != where:
                raise UnsupportedPipelineError(
                    f"a tensor is shared between {prev} and {where}; blocks with shared weights cannot be streamed."
                )
        entries, nbytes, original, scratch = block_entries(block, storage, alignment)
        packed.append(
            (stack, index, entries, nbytes, original, scratch, part)
            if unit == "part"
            else (stack, index, entries, nbytes, original, scratch)
        )
    rest = 0
    seen: set[int] = set()
    for _, _, _, t in module_tensors(module):
        if id(t) in owner_of:
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        rest += t.numel() * t.element_size()
    return tuple((name, len(s)) for name, s in stacks), packed, rest


def compute_layout(
    module: nn.Module,
    resident: int | Collection[int] = 0,
    prefetch: int = 1,
    storage: str | None = None,
    pinned_limit: int | None = None,
    alignment: int = ALIGNMENT,
    unit: str = "block",
) -> StreamingLayout:
    """The :class:`StreamingLayout` of ``module`` (shapes and dtypes only; meta tensors work).

    ``unit="part"`` streams each block as its parts (:func:`~vramkit.engine.blocks.block_parts`):
    the ring slots are as big as the largest part instead of the largest block, and ``resident``
    counts (or lists positions of) parts."""
    stacks, packed, rest = packed_blocks(module, storage, alignment, unit=unit)
    return layout_from_blocks(stacks, packed, rest, resident, prefetch, storage, pinned_limit, alignment, unit)


# --- packing and unpacking --------------------------------------------------------------------


def _byte_view(
    buffer: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    return buffer[offset : offset + nbytes].view(dtype).view(shape)


def pack_block(
    tensors: Mapping[str, torch.Tensor],
    block: BlockLayout,
    out: torch.Tensor,
    work_device: torch.device | str | None = None,
) -> None:
    """Write a block's tensors (by entry name) into ``out`` (a uint8 buffer of ``block.nbytes``).

    ``raw`` and ``cast`` entries are copied (cast) straight in; ``fp8``/``int8`` weights are quantized
    on ``work_device`` (default: where the tensor is), which is much faster on a GPU.
    """
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < block.nbytes:
        raise ValueError(f"pack_block needs a 1-D uint8 buffer of at least {block.nbytes} bytes")
    for e in block.entries:
        src = tensors[e.name]
        dst = _byte_view(out, e.offset, e.nbytes, e.stored_dtype, e.shape)
        if e.codec in ("raw", "cast"):
            dst.copy_(src)
            continue
        scales = _byte_view(out, e.scale_offset, e.scale_nbytes, _codec.SCALE_DTYPE, (e.shape[0],))
        # Rows are independent (one scale each): quantize a few MB at a time, so the fp32
        # temporaries stay small and do not fragment a tight GPU budget.
        step = max(1, _QUANT_CHUNK_ELEMENTS // max(1, e.shape[1]))
        for r0 in range(0, e.shape[0], step):
            rows = src[r0 : r0 + step]
            work = rows if work_device is None else rows.to(work_device)
            q, scale = _codec.quantize_rows(work, e.codec)
            dst[r0 : r0 + step].copy_(q)
            scales[r0 : r0 + step].copy_(scale)


def stored_views(buffer: torch.Tensor, block: BlockLayout) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Views of each entry's stored data (and scales) in a packed ``buffer``, by entry name."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for e in block.entries:
        data = _byte_view(buffer, e.offset, e.nbytes, e.stored_dtype, e.shape)
        scale = None
        if e.scale_offset >= 0:
            scale = _byte_view(buffer, e.scale_offset, e.scale_nbytes, _codec.SCALE_DTYPE, (e.shape[0],))
        out[e.name] = (data, scale)
    return out


def decoded_views(buffer: torch.Tensor, scratch: torch.Tensor | None, block: BlockLayout) -> dict[str, torch.Tensor]:
    """The tensors a block computes with, by entry name, as views (nothing is decoded here).

    For a raw block they are views into the packed ``buffer``; for an encoded block, views into
    ``scratch`` (filled by :func:`decode_block`).
    """
    if block.encoded:
        if scratch is None:
            raise ValueError("an encoded block needs a decode scratch")
        return {
            e.name: _byte_view(scratch, e.scratch_offset, e.decoded_nbytes, e.dtype, e.shape) for e in block.entries
        }
    return {e.name: _byte_view(buffer, e.offset, e.nbytes, e.dtype, e.shape) for e in block.entries}


def decode_block(
    stored: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]],
    targets: Mapping[str, torch.Tensor],
    block: BlockLayout,
    decode: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, str], None] = _codec.decode_into,
) -> None:
    """Decode every entry of an encoded block from its stored views into its scratch views
    (``decode`` has the signature of :func:`~vramkit.engine.codec.decode_into`)."""
    for e in block.entries:
        data, scale = stored[e.name]
        decode(targets[e.name], data, scale, e.codec)


def unpack_block(
    buffer: torch.Tensor, block: BlockLayout, scratch: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The block's tensors from a packed ``buffer`` (decoding into ``scratch``, allocated if needed)."""
    if block.encoded and scratch is None:
        scratch = torch.empty(block.scratch_nbytes, dtype=torch.uint8, device=buffer.device)
    views = decoded_views(buffer, scratch, block)
    if block.encoded:
        decode_block(stored_views(buffer, block), views, block)
    return views


def entries_by_name(block: BlockLayout) -> dict[str, TensorEntry]:
    return {e.name: e for e in block.entries}


def iter_streamed(layout: StreamingLayout) -> Iterable[BlockLayout]:
    return (b for b in layout.blocks if not b.resident)
