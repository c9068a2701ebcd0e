"""The block streamer: partial residency with the streamed blocks copied ahead of use.

:class:`BlockStreamer` takes a module with repeated blocks and a :class:`StreamingLayout` and

1. packs every streamed block into one contiguous host buffer (pinned where the layout says so),
   releasing the block's original storage as soon as its packed copy exists; with ``host="disk"``
   the packed blocks are written one at a time to a file in an offload folder, which is then
   memory-mapped: host RAM holds page cache the kernel can reclaim, not the weights;
2. moves the rest of the module and the resident blocks to the device (resident blocks with an
   fp8/int8/cast storage are packed on the device instead and decoded per run);
3. allocates a ring of ``prefetch + 1`` device slots (each the size of the largest streamed block)
   and, for encoded storages, one decode scratch;
4. installs diffusers hooks (names prefixed ``vramkit_``): one on the module (start of a forward:
   reclaim, prefetch, move inputs to the device) and one per streamed or decoded block (before it
   runs: take its slot, point its parameters at the slot or decode it into the scratch; after: free
   the slot, which immediately receives the next block).

The copies are issued by a :class:`~vramkit.engine.copier.Copier`: a side CUDA stream with events on
a GPU, or a synchronous/checking copier on CPU, so the whole mechanism (hooks, ring, packing,
decoding) runs in CPU tests with bit-identical results.

:meth:`BlockStreamer.restore` puts every parameter back as an ordinary tensor on its original device,
with its original values, removes the hooks, frees the slots and pinned buffers and deletes the
offload file. Parameters keep their identity throughout (only ``.data`` changes), so references
held elsewhere stay valid. The original values of encoded (fp8/int8/cast) tensors are kept for this
in host RAM (``originals="ram"``), or written block by block to an offload file in the offload
folder (``originals="disk"``, always so with ``host="disk"``), each block's originals freed as soon
as they are written: host RAM then holds the packed copy only, not the packed copy plus the
originals (for FLUX.1-dev in fp8, 11.9 GB instead of 11.9 + 23.8 GB).

While streaming, a streamed block's parameters are views into whichever slot it last ran from:
reading them outside the block's forward (``state_dict()``, LoRA loading, ``.to()``) gives another
block's bytes. Inference only: autograd through streamed blocks is not supported.

A module whose weights are still on the meta device (built from its config without weights) can be
streamed when a ``source`` gives each tensor by its name in the module (:class:`TensorSource`, e.g.
a safetensors checkpoint): every tensor is read when it is placed, one block at a time, so the whole
model never sits in RAM. Restoring such a module materializes its weights on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..errors import InvalidRequestError, StrategyConflictError
from .blocks import find_block_stacks, module_tensors, streaming_units
from .copier import Copier, CudaStreamCopier, SyncCopier
from .host import FileBlock, HostBuffer, OffloadFile, default_offload_folder
from .kernels import RowDequantizer
from .layout import (
    ALIGNMENT,
    BlockLayout,
    StreamingLayout,
    block_tensor_map,
    compute_layout,
    decode_block,
    decoded_views,
    pack_block,
    stored_views,
)
from .scheduler import RingScheduler, StreamingStats

__all__ = [
    "BlockStreamer",
    "enable_block_streaming",
    "HOOK_ROOT",
    "HOOK_STREAM",
    "HOOK_DECODE",
    "HOSTS",
    "ORIGINALS",
    "TensorSource",
    "streamer_of",
]

logger = logging.getLogger(__name__)

HOOK_ROOT = "vramkit_streaming"
HOOK_STREAM = "vramkit_stream_block"
HOOK_DECODE = "vramkit_decode_block"
_ATTR = "_vramkit_streamer"

#: Where streamed blocks live on the host: ``"ram"`` (pinned or pageable anonymous memory) or
#: ``"disk"`` (a memory-mapped file in an offload folder).
HOSTS = ("ram", "disk")
#: Where the original values of encoded tensors are kept for an exact restore: ``"ram"`` (host
#: memory) or ``"disk"`` (the offload file; implied by ``host="disk"``).
ORIGINALS = ("ram", "disk")

_Owners = list[tuple[nn.Module, str, str]]


class TensorSource(Protocol):
    """Gives the value of a tensor that is still on the meta device, by its dotted name in the
    streamed module, on ``device`` (read one tensor at a time)."""

    def get(self, name: str, device: torch.device) -> torch.Tensor: ...


def streamer_of(module: nn.Module) -> BlockStreamer | None:
    """The active :class:`BlockStreamer` of ``module``, if any."""
    s = module.__dict__.get(_ATTR)
    return s if isinstance(s, BlockStreamer) else None


def _assign(owners: _Owners, kind: str, tensor: torch.Tensor) -> None:
    """Make every registration of one tensor refer to ``tensor``'s data. Parameters keep their
    identity (``.data`` is swapped, and all owners share the one Parameter object); buffers are
    plain tensors, so each owner's entry is replaced."""
    if kind == "parameter":
        owner, attr, _ = owners[0]
        param = owner._parameters[attr]
        assert param is not None
        if param.device.type == "meta" and tensor.device.type != "meta":
            # ``set_data`` refuses to turn a meta parameter into a real one: give every registration
            # one new Parameter (a meta parameter has no value anybody could be holding on to).
            new = nn.Parameter(tensor, requires_grad=param.requires_grad)
            for o, a, _ in owners:
                o._parameters[a] = new
            return
        param.data = tensor
    else:
        for owner, attr, _ in owners:
            owner._buffers[attr] = tensor


def _current(owners: _Owners, kind: str) -> torch.Tensor:
    owner, attr, _ = owners[0]
    t = owner._parameters[attr] if kind == "parameter" else owner._buffers[attr]
    assert t is not None
    return t.data if kind == "parameter" else t


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    # One element broadcast to the full shape: right shape, dtype and device, no memory.
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, tuple):
        return (
            type(obj)(*(_to_device(o, device) for o in obj))
            if hasattr(obj, "_fields")
            else tuple(_to_device(o, device) for o in obj)
        )
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _real(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "meta" else device


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


class BlockStreamer:
    """Streams a module's repeated blocks through a ring of device slots (see the module docstring).

    Build it with :func:`enable_block_streaming` (or construct, then :meth:`start`); undo with
    :meth:`restore`. ``copier`` defaults to :class:`CudaStreamCopier` on CUDA devices and
    :class:`SyncCopier` elsewhere; ``pin_method`` is passed to :class:`HostBuffer`. ``originals``
    says where the original values of encoded tensors wait for :meth:`restore` (:data:`ORIGINALS`;
    with ``host="disk"`` they always go to the offload file).
    """

    def __init__(
        self,
        module: nn.Module,
        layout: StreamingLayout,
        device: str | torch.device | None = None,
        copier: Copier | None = None,
        pin_method: str = "register",
        fused_decode: bool = True,
        host: str = "ram",
        offload_folder: str | Path | None = None,
        source: TensorSource | None = None,
        park: bool = False,
        park_after_forward: bool = False,
        originals: str = "ram",
        park_rest: bool = False,
    ) -> None:
        if host not in HOSTS:
            raise InvalidRequestError(f"host={host!r}: use one of {HOSTS}.")
        if originals not in ORIGINALS:
            raise InvalidRequestError(
                f"originals={originals!r}: use 'ram' (keep the original values of encoded weights in host "
                "memory) or 'disk' (write them to a file in the offload folder)."
            )
        self.module = module
        self.host = host
        # The streamed blocks' file holds the originals too: there is no RAM copy to choose.
        self.originals = "disk" if host == "disk" else originals
        self.offload_folder = Path(offload_folder) if offload_folder is not None else default_offload_folder()
        self.source = source
        # The offload file: the packed streamed blocks (host="disk") and/or the originals
        # (originals="disk"); created when the first of them is written.
        self._file: OffloadFile | None = None
        self._file_at: dict[int, int] = {}  # streamed block position -> offset of its packed bytes
        # Encoded entries' original values in the offload file: position -> name -> (offset, dtype, shape)
        self._retained_at: dict[int, dict[str, tuple[int, torch.dtype, tuple[int, ...]]]] = {}
        self.layout = layout
        self.device = _resolve_device(device)
        self.pin_method = pin_method
        self._cuda = self.device.type == "cuda"
        self.copier = copier
        self.stats = StreamingStats()
        self.decoder = RowDequantizer(enabled=fused_decode)
        self.active = False
        stacks = find_block_stacks(module)
        if tuple((n, len(s)) for n, s in stacks) != layout.stacks:
            raise InvalidRequestError(f"the layout was computed for stacks {layout.stacks}, not this module's")
        units = streaming_units(stacks, layout.unit)
        if [(s, i, p) for s, i, p, _ in units] != [(b.stack, b.index, b.part) for b in layout.blocks]:
            raise InvalidRequestError(
                f"the layout's {layout.unit} units are not this module's (was it computed for another model?)"
            )
        # The streaming units (whole blocks, or with unit="part" the blocks' parts) by position.
        self._blocks = [m for _, _, _, m in units]
        self._block_ids = {id(b) for b in self._blocks}
        self._tensors: dict[int, dict[str, tuple[str, _Owners]]] = {}
        self._orig_devices: dict[int, dict[str, torch.device]] = {}
        self._host: dict[int, HostBuffer | FileBlock] = {}
        self._dev_bufs: dict[int, torch.Tensor] = {}
        # Encoded entries' original values kept in host memory (originals="ram"): position -> name -> value
        self._retained: dict[int, dict[str, torch.Tensor]] = {}
        self._moved: list[tuple[_Owners, str, torch.device]] = []
        self._slots: list[torch.Tensor] = []
        self._scratch: torch.Tensor | None = None
        self._scratch_views: dict[int, dict[str, torch.Tensor]] = {}
        self._slot_views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._stored: dict[tuple[int, int], dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = {}
        self._dst: dict[tuple[int, int], torch.Tensor] = {}
        self._pointed: dict[int, int] = {}
        self._running_slot: dict[int, int] = {}
        self._hooked: list[tuple[nn.Module, str, bool, bool]] = []
        self.scheduler: RingScheduler | None = None
        self.pinned_nbytes = 0
        self.pageable_nbytes = 0
        self.file_nbytes = 0  # packed streamed blocks in the offload file
        self.originals_nbytes = 0  # original values kept for restore (in RAM or in the offload file)
        self._names = {id(m): n for n, m in module.named_modules()}
        # Parking (see park()): resident blocks are packed on the device with a host copy, so the
        # device copy, the ring and the scratch can be freed while other models run.
        self.parkable = bool(park) or bool(park_after_forward)
        # Park at the end of every forward (a text encoder that runs once per prompt: its ring need
        # not sit on the device through the denoising steps).
        self.park_after_forward = bool(park_after_forward)
        self.parked = False
        self._park_host: dict[int, HostBuffer] = {}
        self.park_count = 0
        # Parking the module's "rest" too (the tensors outside every block: T5's 0.26 GB embedding,
        # a resident CLIP's embeddings): a pinned host copy is made once, and the device copy is
        # freed with the blocks, so a parked text encoder takes nothing on the GPU.
        if park_rest and not self.parkable:
            raise InvalidRequestError(
                "park_rest=True parks the module's rest with its blocks: it needs park=True or park_after_forward=True."
            )
        self.park_rest = bool(park_rest)
        # (owners, kind, host buffer, a typed view of it) per rest tensor; HostBuffer, not
        # pin_memory=True: exact size, released on restore, pin_method honoured, pageable on failure.
        self._rest_host: list[tuple[_Owners, str, HostBuffer, torch.Tensor]] = []
        self._rest_parked = False
        self.rest_host_nbytes = 0

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> BlockStreamer:
        """Pack, place, allocate and hook. On any failure everything done so far is undone."""
        if self.active or streamer_of(self.module) is not None:
            raise StrategyConflictError(f"{type(self.module).__name__} is already streamed by vramkit.")
        self._check_foreign_hooks()
        try:
            for b in self.layout.blocks:
                found = block_tensor_map(self._blocks[b.position])
                # A meta tensor (weights read from a source) is restored onto the CPU.
                self._orig_devices[b.position] = {name: _real(t.device) for name, (_, t, _) in found.items()}
                # Keep how to reach each tensor, not the tensor: holding a buffer here would keep
                # its original storage alive after packing.
                self._tensors[b.position] = {name: (kind, owners) for name, (kind, _, owners) in found.items()}
                del found
            self._pack_streamed()
            # The big fixed buffers first, while the budget is still unfragmented.
            self._allocate_ring()
            self._place_resident_and_rest()
            self._map_file()
            self._point_all()
            self._install_hooks()
        except BaseException:
            self._teardown()
            raise
        finally:
            if self._cuda:
                # Packing may have left temporaries (fp8/int8 quantization on the GPU) in the
                # caching allocator: hand them back so activations get the memory in one piece.
                torch.cuda.empty_cache()
        self.module.__dict__[_ATTR] = self
        self.active = True
        lay = self.layout
        logger.info(
            "BlockStreaming on %s: %d resident / %d streamed %ss, %d slots of %.1f MB, "
            "%.2f GB streamed per forward (%.2f GB pinned, %.2f GB pageable, %.2f GB from disk), device %s",
            type(self.module).__name__,
            len(lay.resident_positions),
            len(lay.streamed_positions),
            lay.unit,
            lay.num_slots,
            lay.slot_nbytes / 1e6,
            lay.streamed_nbytes / 1e9,
            self.pinned_nbytes / 1e9,
            self.pageable_nbytes / 1e9,
            self.file_nbytes / 1e9,
            self.device,
        )
        if self._file_at:
            assert self._file is not None
            logger.info(
                "BlockStreaming on %s: streamed blocks memory-mapped from %s",
                type(self.module).__name__,
                self._file.path,
            )
        if self.originals_nbytes:
            on_disk = self._file is not None and self.originals == "disk"
            logger.info(
                "BlockStreaming on %s: the original values of encoded weights (%.2f GB) are kept %s for an exact "
                "restore",
                type(self.module).__name__,
                self.originals_nbytes / 1e9,
                f"in the offload file {self._file.path}" if on_disk and self._file is not None else "in host RAM",
            )
        return self

    def restore(self) -> None:
        """Undo :meth:`start` exactly (see the module docstring). Safe to call twice."""
        self._teardown()
        self.module.__dict__.pop(_ATTR, None)
        self.active = False

    # --- setup --------------------------------------------------------------------------------

    def _check_foreign_hooks(self) -> None:
        for name, sub in self.module.named_modules():
            if getattr(sub, "_hf_hook", None) is not None:
                raise StrategyConflictError(
                    f"{type(self.module).__name__}{'.' + name if name else ''} has an accelerate hook "
                    "(CPU offload or a device map); remove it before streaming its blocks."
                )
            registry = getattr(sub, "_diffusers_hook", None)
            clashing = (
                [h for h in registry.hooks if h.startswith("vramkit_") or "offload" in h or "layerwise_casting" in h]
                if registry is not None
                else []
            )
            if clashing:
                raise StrategyConflictError(
                    f"{type(self.module).__name__}{'.' + name if name else ''} already has offloading hooks "
                    f"{clashing}; remove them before streaming its blocks."
                )

    def _full_name(self, owners: _Owners) -> str:
        owner, attr, _ = owners[0]
        prefix = self._names.get(id(owner), "")
        return f"{prefix}.{attr}" if prefix else attr

    def _value(self, owners: _Owners, kind: str, device: torch.device | None = None) -> torch.Tensor:
        """The tensor's value: as registered, or read from the source when it is on the meta device
        (onto ``device``, default the CPU)."""
        t = _current(owners, kind)
        if t.device.type != "meta":
            return t
        if self.source is None:
            raise InvalidRequestError(
                f"{type(self.module).__name__}.{self._full_name(owners)} is on the meta device and no weight "
                "source was given; load the weights first (or use vramkit.load, which streams them from disk)."
            )
        value = self.source.get(self._full_name(owners), device or torch.device("cpu"))
        # The meta tensor carries the dtype the module is meant to have (e.g. after a bf16 cast).
        return value if value.dtype == t.dtype else value.to(t.dtype)

    def _pack_streamed(self) -> None:
        if self.host == "disk":
            self._pack_streamed_to_file()
            return
        for b in self.layout.blocks:
            if b.resident:
                continue
            tensors = self._tensors[b.position]
            data = {name: self._value(owners, kind) for name, (kind, owners) in tensors.items()}
            host = HostBuffer(b.nbytes, pin=b.pinned and self._cuda, method=self.pin_method)
            try:
                work = self.device if (self._cuda and b.encoded) else None
                pack_block(data, b, host.tensor, work_device=work)
                self._retain(b, data)
            except BaseException:
                host.release()
                self._forget_retained(b.position)
                raise
            # Only now is the packed copy complete: from here on, restore rebuilds from it.
            self._host[b.position] = host
            if host.pinned:
                self.pinned_nbytes += b.nbytes
            else:
                self.pageable_nbytes += b.nbytes
            for name, (kind, owners) in tensors.items():
                _assign(owners, kind, _placeholder(data[name]))
            del data  # the block's original storage goes with the last reference

    def _pack_streamed_to_file(self) -> None:
        """Pack each streamed block into a RAM buffer of one block and append it to the offload file:
        RAM never holds more than one block (plus, while the module is still in RAM, what is not
        yet packed; each block's original storage goes as soon as it is written)."""
        file = self._offload_file()
        # One staging buffer for every block: allocating and freeing one per block leaves the C
        # allocator holding freed blocks' worth of RSS (glibc raises its mmap threshold after a free).
        staging = torch.empty(
            max((b.nbytes for b in self.layout.blocks if not b.resident), default=0), dtype=torch.uint8
        )
        for b in self.layout.blocks:
            if b.resident:
                continue
            tensors = self._tensors[b.position]
            data = {name: self._value(owners, kind) for name, (kind, owners) in tensors.items()}
            view = staging[: b.nbytes]
            view.zero_()  # alignment padding is written too: keep the file deterministic
            work = self.device if (self._cuda and b.encoded) else None
            pack_block(data, b, view, work_device=work)
            at = file.append(view)
            # Only once the originals are kept too is the block restorable from the file.
            self._retain(b, data)
            self._file_at[b.position] = at
            self.file_nbytes += b.nbytes
            for name, (kind, owners) in tensors.items():
                _assign(owners, kind, _placeholder(data[name]))
            del data

    def _offload_file(self) -> OffloadFile:
        """The offload file, created on first use (a streamer that writes nothing leaves no file)."""
        if self._file is None:
            self._file = OffloadFile(self.offload_folder, type(self.module).__name__)
        return self._file

    def _map_file(self) -> None:
        """Map the offload file and point every streamed block in it at its mapped bytes."""
        if self._file is None or self._file.mapped:
            return
        self._file.map()
        for b in self.layout.blocks:
            if b.position in self._file_at:
                self._host[b.position] = FileBlock(self._file.view(self._file_at[b.position], b.nbytes))

    def _retain(self, b: BlockLayout, data: dict[str, torch.Tensor]) -> None:
        """Keep the original values of lossy/cast entries for an exact restore: in host memory
        (``originals="ram"``), or appended to the offload file (``originals="disk"``), where they cost
        no RAM: the caller drops ``data`` right after, so the block's original storage is freed."""
        encoded = [e for e in b.entries if e.codec != "raw"]
        if not encoded:
            return
        nbytes = sum(e.numel * e.dtype.itemsize for e in encoded)
        if self.originals == "disk":
            file = self._offload_file()
            # Recorded only once every entry is written: a failure midway leaves nothing to restore
            # from (the block's tensors are still its originals), and the file is deleted on teardown.
            self._retained_at[b.position] = {e.name: (file.append(data[e.name]), e.dtype, e.shape) for e in encoded}
        else:
            self._retained[b.position] = {
                e.name: data[e.name] if data[e.name].device.type == "cpu" else data[e.name].to("cpu") for e in encoded
            }
        self.originals_nbytes += nbytes

    def _forget_retained(self, pos: int) -> None:
        """Drop the kept originals of a block whose packing failed (it keeps its own tensors)."""
        self._retained.pop(pos, None)
        self._retained_at.pop(pos, None)

    def _take_original(
        self, pos: int, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """The kept original value of an encoded entry, as a tensor of its own on ``device``.

        Kept in host memory, it *is* the original storage: handed back as it is (and forgotten once
        its block is restored), so a restore never holds two copies of the originals. Kept in the
        offload file, it is read into a new tensor with plain reads (never a view: the file is
        deleted next), so the file's pages do not count in RSS beside the restored weights."""
        kept = self._retained.get(pos)
        if kept is not None and name in kept:
            # Not forgotten yet: a restore that fails midway must still find it when retried.
            value = kept[name]
            if value.device == device and value.dtype == dtype and tuple(value.shape) == tuple(shape):
                return value
            return value.to(device=device, dtype=dtype)
        assert self._file is not None
        off, kept_dtype, kept_shape = self._retained_at[pos][name]
        value = torch.empty(kept_shape, dtype=kept_dtype, device=device)
        self._file.read_into(off, value)
        return value if kept_dtype == dtype else value.to(dtype)

    def _place_resident_and_rest(self) -> None:
        for b in self.layout.blocks:
            if not b.resident:
                continue
            tensors = self._tensors[b.position]
            if b.encoded or self.parkable:
                data = {name: self._value(owners, kind) for name, (kind, owners) in tensors.items()}
                buf = torch.empty(b.nbytes, dtype=torch.uint8, device=self.device)
                try:
                    pack_block(data, b, buf, work_device=self.device)
                    self._retain(b, data)
                except BaseException:
                    self._forget_retained(b.position)
                    raise
                self._dev_bufs[b.position] = buf
                if self.parkable:
                    host = HostBuffer(b.nbytes, pin=self._cuda, method=self.pin_method)
                    host.tensor.copy_(buf)
                    self._park_host[b.position] = host
                for name, (kind, owners) in tensors.items():
                    _assign(owners, kind, _placeholder(data[name]))
                del data
            else:
                for _, (kind, owners) in tensors.items():
                    self._move(owners, kind)
        for kind, owners in self._rest_groups():
            self._move(owners, kind)
            if self.park_rest:
                t = _current(owners, kind)
                nbytes = t.numel() * t.element_size()
                buf = HostBuffer(nbytes, pin=self._cuda, method=self.pin_method)
                view = buf.tensor.view(t.dtype).view(t.shape)
                view.copy_(t)
                self._rest_host.append((owners, kind, buf, view))
                self.rest_host_nbytes += nbytes

    def _rest_groups(self) -> list[tuple[str, _Owners]]:
        """The tensors of the module outside every block, each with all its registrations."""
        in_blocks = {id(m) for b in self._blocks for m in b.modules()}
        groups: dict[int, tuple[str, _Owners]] = {}
        for owner, attr, kind, t in module_tensors(self.module):
            if id(owner) in in_blocks:
                continue
            groups.setdefault(id(t), (kind, []))[1].append((owner, attr, attr))
        return list(groups.values())

    def _move(self, owners: _Owners, kind: str) -> None:
        t = _current(owners, kind)
        if t.device.type == "meta":
            # Read straight onto the device: a resident tensor never passes through host RAM whole.
            _assign(owners, kind, self._value(owners, kind, self.device))
            self._moved.append((owners, kind, torch.device("cpu")))
            return
        if t.device == self.device:
            return
        _assign(owners, kind, t.to(self.device))
        self._moved.append((owners, kind, t.device))

    def _allocate_ring(self) -> None:
        lay = self.layout
        order = list(lay.streamed_positions)
        self._slots = [
            torch.empty(lay.slot_nbytes, dtype=torch.uint8, device=self.device) for _ in range(lay.num_slots)
        ]
        if lay.scratch_nbytes:
            self._scratch = torch.empty(lay.scratch_nbytes, dtype=torch.uint8, device=self.device)
        if self.copier is None:
            self.copier = CudaStreamCopier(self.device, lay.num_slots) if self._cuda else SyncCopier()
        self.scheduler = RingScheduler(order, lay.num_slots, self._source, self._target, self.copier, self.stats)

    def _source(self, pos: int) -> torch.Tensor:
        return self._host[pos].tensor

    def _target(self, pos: int, slot: int) -> torch.Tensor:
        return self._dst[(pos, slot)]

    def _point_all(self) -> None:
        # Every view the hooks will need is made here, once, outside any inference_mode: the
        # hooks only look them up (no tensor is created or sliced inside a step).
        for b in self.layout.blocks:
            if b.resident:
                if b.encoded:
                    self._stored_in(b, None)
                continue
            for k in range(len(self._slots)):
                self._dst[(b.position, k)] = self._slots[k][: b.nbytes]
                if b.encoded:
                    self._stored_in(b, k)
                else:
                    self._views_in_slot(b, k)
        for b in self.layout.blocks:
            tensors = self._tensors[b.position]
            if b.encoded:
                views = decoded_views(self._dev_bufs.get(b.position, self._scratch), self._scratch, b)
                self._scratch_views[b.position] = views
            elif not b.resident:
                views = self._views_in_slot(b, 0)
                self._pointed[b.position] = 0
            elif b.position in self._dev_bufs:
                views = decoded_views(self._dev_bufs[b.position], None, b)
            else:
                continue
            for name, (kind, owners) in tensors.items():
                _assign(owners, kind, views[name])

    def _views_in_slot(self, b: BlockLayout, slot: int) -> dict[str, torch.Tensor]:
        key = (b.position, slot)
        views = self._slot_views.get(key)
        if views is None:
            views = decoded_views(self._slots[slot], None, b)
            self._slot_views[key] = views
        return views

    def _stored_in(self, b: BlockLayout, slot: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        key = (b.position, -1 if slot is None else slot)
        views = self._stored.get(key)
        if views is None:
            buf = self._dev_bufs[b.position] if slot is None else self._slots[slot]
            views = stored_views(buf, b)
            self._stored[key] = views
        return views

    def _install_hooks(self) -> None:
        self._register(self.module, _RootHook(self), HOOK_ROOT)
        for b in self.layout.blocks:
            block = self._blocks[b.position]
            if not b.resident:
                self._register(block, _StreamHook(self, b), HOOK_STREAM)
            elif b.encoded:
                self._register(block, _DecodeHook(self, b), HOOK_DECODE)
        registry = getattr(self.module, "_diffusers_hook", None)
        if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
            registry.invalidate_child_registries_cache()

    def _register(self, module: nn.Module, hook: Any, name: str) -> None:
        had_registry = hasattr(module, "_diffusers_hook")
        had_forward = "forward" in module.__dict__
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self._hooked.append((module, name, had_registry, had_forward))

    # --- per-block work (called from the hooks) -----------------------------------------------

    def _before_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.stats.forwards += 1
        if self.parked:
            self.unpark()
        assert self.scheduler is not None
        self.scheduler.begin_forward()
        return _to_device(args, self.device), _to_device(kwargs, self.device)

    def _before_streamed(self, b: BlockLayout) -> None:
        assert self.scheduler is not None
        slot = self.scheduler.acquire(b.position)
        if b.encoded:
            decode_block(self._stored_in(b, slot), self._scratch_views[b.position], b, self.decoder)
            # Everything the block needs is in the scratch now: the slot can take the next copy
            # while this block computes.
            self.scheduler.release(b.position, slot)
            return
        if self._pointed.get(b.position) != slot:
            views = self._views_in_slot(b, slot)
            for name, (kind, owners) in self._tensors[b.position].items():
                _assign(owners, kind, views[name])
            self._pointed[b.position] = slot
        self._running_slot[b.position] = slot

    def _after_streamed(self, b: BlockLayout) -> None:
        slot = self._running_slot.pop(b.position, None)
        if slot is not None and self.scheduler is not None:
            self.scheduler.release(b.position, slot)

    def _before_decoded(self, b: BlockLayout) -> None:
        decode_block(self._stored_in(b, None), self._scratch_views[b.position], b, self.decoder)

    # --- parking ------------------------------------------------------------------------------

    def park(self) -> None:
        """Free everything this streamer holds on the device but the module's small "rest": the
        resident blocks (their host copy stays), the ring and the scratch. The next forward brings
        them back (:meth:`unpark`): one copy of the resident bytes. Used while another model (the
        VAE decode) needs the memory; a no-op unless the streamer was built with ``park=True``."""
        if not self.parkable or self.parked or not self.active:
            return
        # The ring is written by the copy stream and the buffers read by queued kernels: wait for
        # both before the memory goes back to the allocator (once per pipeline call).
        self._synchronize()
        zeros: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        held = [kind_owners for b in self.layout.blocks for kind_owners in self._tensors[b.position].values()]
        held += [(kind, owners) for owners, kind, _, _ in self._rest_host]
        with torch.inference_mode(False):
            for kind, owners in held:
                t = _current(owners, kind)
                key = (t.dtype, t.device)
                if key not in zeros:
                    zeros[key] = torch.zeros((), dtype=t.dtype, device=t.device)
                _assign(owners, kind, zeros[key].expand(t.shape))
            self._rest_parked = bool(self._rest_host)
        self._dev_bufs.clear()
        self._slots = []
        self._scratch = None
        self._slot_views.clear()
        self._stored.clear()
        self._dst.clear()
        self._scratch_views.clear()
        self._pointed.clear()
        self._running_slot.clear()
        self.scheduler = None
        self.parked = True
        self.park_count += 1

    def unpark(self) -> None:
        """Undo :meth:`park`: reallocate the ring, copy the resident blocks back, re-point."""
        if not self.parked:
            return
        # Called from the first forward, possibly under torch.inference_mode: buffers and views made
        # there would be inference tensors that every later call outside it could not update.
        with torch.inference_mode(False):
            self._allocate_ring()
            if self._cuda and self.copier is not None:
                # The new slots may be memory that kernels still queued on the compute stream were
                # using (another model's activations, freed moments ago): the copy stream must not
                # write them before that work is done. The pre-park free events are long past.
                for k in range(len(self._slots)):
                    self.copier.mark_free(k)
            for pos, host in self._park_host.items():
                buf = torch.empty(host.tensor.numel(), dtype=torch.uint8, device=self.device)
                buf.copy_(host.tensor, non_blocking=self._cuda)
                self._dev_bufs[pos] = buf
            self._unpark_rest()
            self._point_all()
        self.parked = False

    @property
    def park_pinned_nbytes(self) -> int:
        """Pinned host copies kept for parking (resident blocks and the rest), beside
        ``pinned_nbytes`` (the streamed blocks')."""
        blocks = sum(h.nbytes for h in self._park_host.values() if h.pinned)
        return blocks + sum(buf.nbytes for _, _, buf, _ in self._rest_host if buf.pinned)

    def _unpark_rest(self, to_origin: bool = False) -> None:
        """Copy the parked rest back to the device from its host copy. With ``to_origin`` (teardown)
        each tensor goes straight back to where start() found it: one that came from host RAM gets a
        pageable copy of its host copy (no trip through the device, whose memory is what the smallest
        budgets lack), and the device copies block (the host buffers are released right after)."""
        if not self._rest_parked:
            return
        came_from = {id(owners): device for owners, _, device in self._moved} if to_origin else {}
        for owners, kind, buf, view in self._rest_host:
            origin = came_from.get(id(owners))
            if origin is not None and origin.type != self.device.type:
                _assign(owners, kind, view.clone().to(origin))
                continue
            value = torch.empty(view.shape, dtype=view.dtype, device=self.device)
            value.copy_(view, non_blocking=self._cuda and buf.pinned and not to_origin)
            _assign(owners, kind, value)
            if not to_origin:
                self.stats.bytes_copied += value.numel() * value.element_size()
        self._rest_parked = False

    # --- teardown -----------------------------------------------------------------------------

    def _synchronize(self) -> None:
        if self.copier is not None:
            self.copier.synchronize()
        if self._cuda and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)

    def _teardown(self) -> None:
        self._synchronize()
        self._remove_hooks()
        if self._file is not None:
            # Blocks written before a failed start are only reachable through the mapping.
            self._map_file()
        for b in self.layout.blocks:
            pos = b.position
            if pos in self._host:
                self._unpack_to_original(b, self._host[pos].tensor)
                self._host.pop(pos).release()
            elif pos in self._dev_bufs:
                self._unpack_to_original(b, self._dev_bufs[pos])
                del self._dev_bufs[pos]
            elif pos in self._park_host:
                self._unpack_to_original(b, self._park_host[pos].tensor)
        for host in self._park_host.values():
            host.release()
        self._park_host.clear()
        self.parked = False
        with torch.inference_mode(False):
            self._unpark_rest(to_origin=True)
        for _, _, buf, _ in self._rest_host:
            buf.release()
        self._rest_host.clear()
        self.rest_host_nbytes = 0
        for owners, kind, device in reversed(self._moved):
            _assign(owners, kind, _current(owners, kind).to(device))
        self._moved.clear()
        self._retained.clear()
        self._retained_at.clear()
        self.originals_nbytes = 0
        self._file_at.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
        self._slot_views.clear()
        self._stored.clear()
        self._dst.clear()
        self._scratch_views.clear()
        self._pointed.clear()
        self._running_slot.clear()
        self._slots = []
        self._scratch = None
        self.scheduler = None
        if self.copier is not None:
            self.copier.close()
        self.pinned_nbytes = self.pageable_nbytes = self.file_nbytes = 0

    def _unpack_to_original(self, b: BlockLayout, buffer: torch.Tensor) -> None:
        pos = b.position
        tensors = self._tensors[pos]
        raw = stored_views(buffer, b)
        for e in b.entries:
            kind, owners = tensors[e.name]
            device = self._orig_devices[pos][e.name]
            if e.codec == "raw":
                src = raw[e.name][0]
                value = torch.empty(e.shape, dtype=e.dtype, device=device)
                value.copy_(src)
            else:
                value = self._take_original(pos, e.name, e.shape, e.dtype, device)
            _assign(owners, kind, value)
        # The block has its weights back: its kept originals are now the parameters' own storage.
        self._retained.pop(pos, None)

    def _remove_hooks(self) -> None:
        for module, name, had_registry, had_forward in reversed(self._hooked):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            registry.remove_hook(name, recurse=False)
            if not registry.hooks:
                # diffusers leaves the bound original ``forward`` as an instance attribute.
                if not had_forward:
                    module.__dict__.pop("forward", None)
                # An empty registry made by someone else (diffusers' ``cache_context`` makes
                # one on every call) stays; one made for our hook goes.
                if not had_registry:
                    del module._diffusers_hook
        self._hooked.clear()
        registry = getattr(self.module, "_diffusers_hook", None)
        if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
            registry.invalidate_child_registries_cache()

    # --- reporting ----------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Layout figures, what was actually pinned, and the counters."""
        out = self.layout.summary()
        out.update(
            {
                "device": str(self.device),
                "pinned_nbytes_actual": self.pinned_nbytes,
                "pageable_nbytes_actual": self.pageable_nbytes,
                "host": self.host,
                "file_nbytes_actual": self.file_nbytes,
                "originals": self.originals,
                "originals_nbytes_actual": self.originals_nbytes,
                "park_rest": self.park_rest,
                "rest_host_nbytes": self.rest_host_nbytes,
                "offload_file": str(self._file.path) if self._file is not None else None,
                "copier": type(self.copier).__name__ if self.copier is not None else None,
                "fused_decodes": self.decoder.fused_calls,
                "torch_decodes": self.decoder.fallback_calls,
                "stats": self.stats.as_dict(),
            }
        )
        return out


class _RootHook(ModelHook):  # type: ignore[misc]
    """Start of a forward of the streamed module: reclaim, prefetch, move inputs to the device."""

    def __init__(self, streamer: BlockStreamer) -> None:
        super().__init__()
        self.streamer = streamer

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self.streamer._before_forward(args, kwargs)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.streamer.park_after_forward:
            self.streamer.park()
        return output


class _StreamHook(ModelHook):  # type: ignore[misc]
    """Around a streamed block: take its slot before it runs, free the slot after."""

    def __init__(self, streamer: BlockStreamer, block: BlockLayout) -> None:
        super().__init__()
        self.streamer = streamer
        self.block = block

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.streamer._before_streamed(self.block)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.streamer._after_streamed(self.block)
        return output


class _DecodeHook(ModelHook):  # type: ignore[misc]
    """Before a resident block stored as fp8/int8/cast: decode it into the scratch."""

    def __init__(self, streamer: BlockStreamer, block: BlockLayout) -> None:
        super().__init__()
        self.streamer = streamer
        self.block = block

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.streamer._before_decoded(self.block)
        return args, kwargs


def enable_block_streaming(
    module: nn.Module,
    *,
    resident: int | Collection[int] = 0,
    prefetch: int = 1,
    storage: str | None = None,
    device: str | torch.device | None = None,
    pinned_limit: int | None = None,
    copier: Copier | None = None,
    pin_method: str = "register",
    alignment: int = ALIGNMENT,
    fused_decode: bool = True,
    host: str = "ram",
    park: bool = False,
    offload_folder: str | Path | None = None,
    source: TensorSource | None = None,
    park_after_forward: bool = False,
    unit: str = "block",
    originals: str = "ram",
    park_rest: bool = False,
) -> BlockStreamer:
    """Stream ``module``'s repeated blocks onto ``device``; returns the started :class:`BlockStreamer`
    (call its ``restore()`` to undo). ``resident`` is a count (placed by
    :func:`~vramkit.engine.blocks.choose_resident`: streamed bytes per stack follow its compute, spread
    evenly within each stack) or explicit positions in execution order; ``host="disk"`` keeps the
    streamed blocks in a memory-mapped file in ``offload_folder``; ``originals="disk"`` keeps the
    original values of encoded tensors (for :meth:`~BlockStreamer.restore`) in a file there instead
    of host RAM; ``park_rest=True`` (with ``park`` or ``park_after_forward``) parks the tensors
    outside the blocks too (a pinned host copy; nothing of the module stays on the device while
    parked); ``unit="part"`` streams each
    block as its parts (smaller ring slots; ``resident`` then counts parts); see
    :func:`~vramkit.engine.layout.compute_layout` for the other arguments."""
    layout = compute_layout(module, resident, prefetch, storage, pinned_limit, alignment, unit)
    return BlockStreamer(
        module,
        layout,
        device=device,
        copier=copier,
        pin_method=pin_method,
        fused_decode=fused_decode,
        host=host,
        park=park,
        park_after_forward=park_after_forward,
        offload_folder=offload_folder,
        source=source,
        originals=originals,
        park_rest=park_rest,
    ).start()
