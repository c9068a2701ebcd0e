"""``BlockStreaming``: keep as many of a component's repeated blocks on the GPU as the budget allows
and stream the others from pinned host memory (or, with ``host="disk"``, from a memory-mapped file
in an offload folder) just ahead of use (the mechanism is :mod:`vramkit.engine`).

Unlike diffusers' group offloading, which streams every weight every step, only the blocks that do
not fit are copied, on a side CUDA stream, while the resident blocks compute: the step costs about
``max(compute, streamed bytes / host-to-device bandwidth)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._state import get_state
from ..engine import BlockStreamer, compute_layout, find_block_stacks, max_resident_for_budget
from ..engine.blocks import STREAMABLE_COMPONENTS, UNITS
from ..engine.layout import STORAGES
from ..engine.streamer import HOSTS, ORIGINALS, TensorSource
from ..errors import InvalidRequestError, UnsupportedPipelineError
from .base import Strategy, Undo, register_strategy
from .configs import _components
from .placement import bind_device

__all__ = [
    "BlockStreaming",
    "apply_block_streaming",
    "STREAMABLE_COMPONENTS",
    "NO_CUDA_REASON",
    "attach_weight_source",
    "weight_source_of",
]

logger = logging.getLogger("vramkit")

NO_CUDA_REASON = "no CUDA device: BlockStreaming is a no-op here"
_SOURCE_ATTR = "_vramkit_weight_source"


def attach_weight_source(module: nn.Module, source: TensorSource | None) -> None:
    """Tell BlockStreaming where the weights of a module built on the meta device are
    (:func:`vramkit.load` does this); ``None`` detaches it."""
    if source is None:
        module.__dict__.pop(_SOURCE_ATTR, None)
    else:
        module.__dict__[_SOURCE_ATTR] = source


def weight_source_of(module: nn.Module) -> TensorSource | None:
    """The weight source attached to ``module`` by :func:`attach_weight_source`, if any."""
    return module.__dict__.get(_SOURCE_ATTR)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _optional_positive_int(owner: str, name: str, value: Any, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequestError(f"{owner}({name}={value!r}): must be None or an int >= {minimum}.")
    return int(value)


@dataclass(frozen=True)
class BlockStreaming(Strategy):
    """Partial residency with prefetch: ``resident`` blocks stay on the GPU, the others are copied
    in, ``prefetch`` blocks ahead, through a ring of ``prefetch + 1`` GPU slots.

    - ``resident``: blocks kept on the GPU; ``None`` = as many as ``budget`` allows, or 0 when no
      budget is given. A count is placed so that each stack streams bytes in proportion to its
      compute (FLUX's double-stream blocks compute half as much per byte as its single-stream ones),
      spread evenly within each stack (:func:`~vramkit.engine.blocks.choose_resident`).
    - ``prefetch``: blocks copied ahead (ring of ``prefetch + 1`` slots, each as big as the largest
      streamed block).
    - ``storage``: ``None`` keeps the weights as loaded (bit-identical output); ``"bf16"``/``"fp16"``
      store wider floats in 16 bits; ``"fp8"`` (float8_e4m3fn) and ``"int8"`` store the Linear
      weights of every block with one scale per output channel, upcast on the GPU per block
      (lossy; halves the bytes on the wire and at rest).
    - ``components``: default ``("transformer",)``; ``"controlnet"``, ``"text_encoder_2"`` (T5) and
      ``"text_encoder"`` (CLIP, with ``park_after_forward`` and ``park_rest``: parked between prompts)
      are also streamable.
    - ``device``: default ``cuda:0`` (the current CUDA device).
    - ``budget``: bytes of GPU memory the component's weights may take (the rest of the model, the
      resident blocks, the ring and the decode scratch; activations not included), used when
      ``resident`` is ``None``.
    - ``pinned_limit``: at most this many bytes of streamed blocks are page-locked; the others stay
      in pageable memory (slower copies that block the host).
    - ``host``: ``"ram"`` (default) keeps the streamed blocks in host RAM (pinned up to
      ``pinned_limit``); ``"disk"`` writes them, one block at a time, to a file in
      ``offload_folder`` and memory-maps it, so host RAM holds only page cache the kernel can
      reclaim: for when the weights do not fit in RAM. Copies then run at the disk read rate (the
      first pass) or the pageable rate (pages still cached), well below pinned speed.
    - ``park_during_decode``: free the resident blocks, the ring and the decode scratch while the
      VAE decodes (the resident blocks keep a pinned host copy, so host RAM grows by their size);
      the next forward copies them back (once per call). Lets a lossless plan keep more blocks
      resident without the decode's activations having to fit beside them. The streamer also starts
      parked, so the text encoders run beside the module's rest only.
    - ``park_after_forward``: free the resident blocks, the ring and the scratch at the end of every
      forward of the component (the next forward brings them back). For a text encoder, which runs
      once per prompt: its ring would otherwise sit on the GPU through every denoising step.
    - ``park_rest``: with ``park_during_decode`` or ``park_after_forward``, park the component's
      tensors outside its blocks too (T5's 0.26 GB embedding; everything of a CLIP streamed with all
      its layers resident): a pinned host copy is made once, and while parked nothing of the
      component stays on the GPU; the next forward copies it back (lossless). For the smallest
      budgets, where the VAE decode's activations must fit beside only the VAE.
    - ``originals``: where the original values of the weights a lossy or cast ``storage`` re-encodes
      are kept until restore (an exact restore needs them). ``"ram"`` (default) keeps them in host
      RAM: fastest to apply and restore, but host RAM then holds the packed copy *and* the originals
      (FLUX.1-dev in fp8: 11.9 GB + 23.8 GB). ``"disk"`` writes them, block by block, to a file in
      ``offload_folder`` (each block's originals are freed as soon as they are written) and reads
      them back on restore: host RAM holds only the packed copy. With ``host="disk"`` the originals
      always go to the offload file (``"ram"`` is taken as ``"disk"``). Nothing is written when
      ``storage`` re-encodes nothing.
    - ``offload_folder``: where ``host="disk"`` and ``originals="disk"`` write (default
      ``$VRAMKIT_OFFLOAD_DIR``, else ``offload/`` in vramkit's cache directory; put it on a fast
      local SSD, not on a tmpfs). The file is deleted on restore.
    - ``unit``: what streams as one piece through the ring. ``"block"`` (default) streams whole
      repeated blocks. ``"part"`` streams each block as its parameter-owning children, in the order
      its forward calls them (:func:`~vramkit.engine.blocks.block_parts`; FLUX's double-stream
      block as ``norm1, norm1_context, attn, ff, ff_context``, its single-stream block as
      ``norm, proj_mlp, attn, proj_out``; blocks of other classes, e.g. T5's, stay whole): the ring
      slots shrink from the largest block to the largest part (FLUX.1-dev bf16: 0.68 GB to about
      0.15 GB each), memory that can hold resident blocks instead. ``resident`` then counts parts.
      Measured on an H100 as close to the copy floor as whole blocks (and faster for the residency
      it frees); the planner picks it when predicted faster. Not combinable with ``Compile`` (the
      compiled block forward would trace the part hooks): compiled plans stream whole blocks.

    Without a CUDA device the step is a no-op, except with ``host="disk"`` and an explicit
    ``device="cpu"``: the blocks then stream from the file into CPU slots (bounded RAM on a
    machine without a GPU). Reversible: the original weights (values, devices,
    parameter objects) come back exactly, fp8/int8 included (their originals are kept in host RAM,
    or with ``originals="disk"`` or ``host="disk"`` in the offload file).
    """

    resident: int | None = None
    prefetch: int = 1
    storage: str | None = None
    components: tuple[str, ...] | None = None
    device: str | None = None
    budget: int | None = None
    pinned_limit: int | None = None
    host: str = "ram"
    offload_folder: str | None = None
    park_during_decode: bool = False
    park_after_forward: bool = False
    unit: str = "block"
    originals: str = "ram"
    park_rest: bool = False

    name: ClassVar[str] = "BlockStreaming"
    order: ClassVar[int] = 70
    conflicts_with: ClassVar[frozenset[str]] = frozenset({"ModelOffload", "SequentialOffload", "Quantize", "StoreFP8"})
    default_components: ClassVar[tuple[str, ...]] = ("transformer",)

    def __post_init__(self) -> None:
        _set(self, "resident", _optional_positive_int(self.name, "resident", self.resident, 0))
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 1:
            raise InvalidRequestError(f"BlockStreaming(prefetch={self.prefetch!r}): must be an int >= 1.")
        storage = self.storage.lower() if isinstance(self.storage, str) else self.storage
        if storage not in STORAGES:
            raise InvalidRequestError(
                f"BlockStreaming(storage={self.storage!r}): use None (as loaded), 'bf16', 'fp16', 'fp8' or 'int8'."
            )
        _set(self, "storage", storage)
        comps = _components(self.components)
        if comps is not None:
            bad = [c for c in comps if c not in STREAMABLE_COMPONENTS]
            if bad:
                raise InvalidRequestError(
                    f"BlockStreaming(components={list(comps)}): {bad} cannot be streamed; "
                    f"use some of {list(STREAMABLE_COMPONENTS)}."
                )
        _set(self, "components", comps)
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise InvalidRequestError(f"BlockStreaming(device={self.device!r}): not a device ({exc}).") from None
        _set(self, "budget", _optional_positive_int(self.name, "budget", self.budget, 1))
        _set(self, "pinned_limit", _optional_positive_int(self.name, "pinned_limit", self.pinned_limit, 0))
        host = self.host.lower() if isinstance(self.host, str) else self.host
        if host not in HOSTS:
            raise InvalidRequestError(
                f"BlockStreaming(host={self.host!r}): use 'ram' (pinned/pageable host memory) or 'disk' "
                "(a memory-mapped file in offload_folder)."
            )
        _set(self, "host", host)
        unit = self.unit.lower() if isinstance(self.unit, str) else self.unit
        if unit not in UNITS:
            raise InvalidRequestError(
                f"BlockStreaming(unit={self.unit!r}): use 'block' (whole repeated blocks) or 'part' "
                "(each block's parameter-owning children, smaller ring slots)."
            )
        _set(self, "unit", unit)
        originals = self.originals.lower() if isinstance(self.originals, str) else self.originals
        if originals not in ORIGINALS:
            raise InvalidRequestError(
                f"BlockStreaming(originals={self.originals!r}): use 'ram' (keep the original values of re-encoded "
                "weights in host RAM for an exact restore) or 'disk' (write them to a file in offload_folder, so "
                "host RAM holds only the packed copy)."
            )
        # The offload file of host='disk' holds the originals as well: there is no RAM copy to choose.
        _set(self, "originals", "disk" if host == "disk" else originals)
        if not isinstance(self.park_during_decode, bool):
            raise InvalidRequestError(
                f"BlockStreaming(park_during_decode={self.park_during_decode!r}): give True or False."
            )
        if not isinstance(self.park_after_forward, bool):
            raise InvalidRequestError(
                f"BlockStreaming(park_after_forward={self.park_after_forward!r}): give True or False."
            )
        if not isinstance(self.park_rest, bool):
            raise InvalidRequestError(f"BlockStreaming(park_rest={self.park_rest!r}): give True or False.")
        if self.park_rest and not (self.park_during_decode or self.park_after_forward):
            raise InvalidRequestError(
                "BlockStreaming(park_rest=True) parks the component's rest together with its blocks: add "
                "park_during_decode=True or park_after_forward=True."
            )
        if self.offload_folder is not None:
            if not isinstance(self.offload_folder, (str, os.PathLike)) or not str(self.offload_folder):
                raise InvalidRequestError(
                    f"BlockStreaming(offload_folder={self.offload_folder!r}): give a directory path."
                )
            if host != "disk" and self.originals != "disk":
                raise InvalidRequestError(
                    "BlockStreaming(offload_folder=...) is only used with host='disk' or originals='disk'; add one "
                    "of them or drop it."
                )
            _set(self, "offload_folder", os.fspath(self.offload_folder))

    def describe(self) -> str:
        # Defaults are left out, so plans printed before ``unit``/``originals`` existed read the same;
        # so is originals='disk' where host='disk' implies it.
        text = super().describe()
        if self.unit == "block":
            text = text.replace(", unit='block'", "")
        if self.originals == "ram" or self.host == "disk":
            text = text.replace(f", originals={self.originals!r}", "")
        if not self.park_rest:
            text = text.replace(", park_rest=False", "")
        return text

    # --- plan-time answers --------------------------------------------------------------------

    def _effective(self) -> bool:
        """Whether the step does anything on this machine: it needs a CUDA device, except that
        streaming from disk into CPU slots is asked for explicitly with ``device="cpu"``."""
        if self.host == "disk" and self.device is not None and torch.device(self.device).type == "cpu":
            return True
        if not torch.cuda.is_available():
            return False
        return self.device is None or torch.device(self.device).type == "cuda"

    def step_lossless(self, pipe: Any, component: str | None) -> bool:
        # Answered for the storage alone (not for whether this machine has CUDA), so a plan says the
        # same thing wherever it is made.
        if self.storage is None:
            return True
        if self.storage in ("fp8", "int8"):
            return False
        # bf16/fp16 only narrows floats wider than 16 bits; none means nothing changes.
        module = getattr(pipe, component or "", None)
        if not isinstance(module, nn.Module):
            return False
        return all(not p.dtype.is_floating_point or p.dtype.itemsize <= 2 for p in module.parameters())

    def default_reason(self, component: str | None) -> str:
        if not self._effective():
            return NO_CUDA_REASON
        what = "blocks" if self.unit == "block" else "block parts"
        how = f"as many {what} as the budget allows" if self.resident is None else f"{self.resident} {what}"
        if self.host == "disk":
            return (
                f"keeps {how} of {component} on the {self.device or 'GPU'} and streams the others from a "
                f"memory-mapped file in the offload folder {self.prefetch} block(s) ahead (host RAM holds only "
                "reclaimable page cache; copies run at disk/pageable speed)" + self._originals_reason()
            )
        return (
            f"keeps {how} of {component} on the GPU and streams the others from pinned host memory "
            f"{self.prefetch} block(s) ahead, hidden behind the resident blocks' compute" + self._originals_reason()
        )

    def _originals_reason(self) -> str:
        """Where the originals of re-encoded weights wait for restore, for the reasons."""
        if self.storage is None:
            return ""
        if self.originals == "disk":
            return (
                f"; the original values of the weights stored {self.storage} are kept in a file in the offload "
                "folder for an exact restore (not in host RAM)"
            )
        return f"; the original values of the weights stored {self.storage} stay in host RAM for an exact restore"

    def check(self, pipe: Any, component: str | None) -> None:
        module = getattr(pipe, component or "", None)
        if not isinstance(module, nn.Module):
            raise InvalidRequestError(f"BlockStreaming: the pipeline has no model component {component!r}.")
        for target in _targets(module):
            if not find_block_stacks(target):
                raise UnsupportedPipelineError(
                    f"BlockStreaming: {component} ({type(target).__name__}) has no block stack vramkit can stream."
                )


def _targets(module: nn.Module) -> list[nn.Module]:
    """The modules to stream: the component itself, or each ControlNet of a multi-ControlNet."""
    nets = getattr(module, "nets", None)
    if not find_block_stacks(module) and isinstance(nets, nn.ModuleList):
        return list(nets)
    return [module]


def _device(config: BlockStreaming) -> torch.device:
    if config.device is None:
        return torch.device("cuda", torch.cuda.current_device())
    d = torch.device(config.device)
    return torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d


@register_strategy(BlockStreaming)
def apply_block_streaming(pipe: Any, config: BlockStreaming, component: str | None) -> Undo:
    """Stream ``component``'s blocks (see :class:`BlockStreaming`); returns the exact undo."""
    if not config._effective():
        logger.info("BlockStreaming on %s: %s", component, NO_CUDA_REASON)
        return lambda: None
    module = getattr(pipe, component or "")
    device = _device(config)
    streamers: list[BlockStreamer] = []
    unhook: Callable[[], None] | None = None
    try:
        for target in _targets(module):
            if config.resident is not None:
                layout = compute_layout(
                    target, config.resident, config.prefetch, config.storage, config.pinned_limit, unit=config.unit
                )
            elif config.budget is not None:
                layout = max_resident_for_budget(
                    target, config.budget, config.prefetch, config.storage, config.pinned_limit, unit=config.unit
                )
            else:
                layout = compute_layout(
                    target, 0, config.prefetch, config.storage, config.pinned_limit, unit=config.unit
                )
            streamers.append(
                BlockStreamer(
                    target,
                    layout,
                    device=device,
                    host=config.host,
                    offload_folder=config.offload_folder,
                    originals=config.originals,
                    source=weight_source_of(target),
                    park=config.park_during_decode,
                    park_after_forward=config.park_after_forward,
                    park_rest=config.park_rest,
                ).start()
            )
        unhook = _park_around_vae_decode(pipe, streamers) if config.park_during_decode else None
        if config.park_during_decode or config.park_after_forward:
            # Start parked: the first forward brings everything in, so what runs before it (the text
            # encoders, an image's VAE encode) has the memory; the planner counts on it.
            for s in streamers:
                s.park()
        # With an explicit device (several GPUs) the component's outputs go back to the execution
        # device; registered after the streamer's hooks so it is outermost and sees the caller's inputs.
        unbind = bind_device(pipe, component or "", module, device) if config.device is not None else None
    except BaseException:
        if unhook is not None:
            unhook()
        for s in reversed(streamers):
            s.restore()
        raise
    state = get_state(pipe)
    if state is not None:
        state.placed[component or ""] = "BlockStreaming"
    for note in (n for s in streamers for n in s.layout.notes):
        logger.info("BlockStreaming on %s: %s", component, note)

    def undo() -> None:
        # Reverse order of apply: the device hook went on last.
        if unbind is not None:
            unbind()
        if unhook is not None:
            unhook()
        for s in reversed(streamers):
            s.restore()
        if state is not None:
            state.placed.pop(component or "", None)

    return undo


def _park_around_vae_decode(pipe: Any, streamers: list[BlockStreamer]) -> Callable[[], None] | None:
    """Make ``pipe.vae.decode`` park ``streamers`` first; returns the function that takes it back.

    An instance attribute shadows the class's ``decode`` and calls whatever ``decode`` was there
    before it (another streamer's wrapper, else the class's: vramkit's recovery guard during a call),
    so several streamed components chain and each undo restores exactly what it replaced.
    """
    vae = getattr(pipe, "vae", None)
    if vae is None or not hasattr(vae, "decode"):
        logger.info("BlockStreaming(park_during_decode=True): the pipeline has no VAE decode; nothing parks.")
        return None
    had_own = "decode" in vae.__dict__
    previous = vae.__dict__.get("decode")

    active = [True]

    def decode(*args: Any, **kwargs: Any) -> Any:
        if active[0]:
            for s in streamers:
                s.park()
        if previous is not None:
            return previous(*args, **kwargs)
        return type(vae).decode(vae, *args, **kwargs)

    decode.__vramkit_park__ = True  # type: ignore[attr-defined]
    vae.__dict__["decode"] = decode

    def unhook() -> None:
        # Something wrapped decode on top of this (the profiler, during a recovery inside a profiled
        # call) keeps a reference and may put it back: from now on it only passes the call through.
        active[0] = False
        if vae.__dict__.get("decode") is decode:
            if had_own:
                vae.__dict__["decode"] = previous
            else:
                vae.__dict__.pop("decode", None)

    return unhook
