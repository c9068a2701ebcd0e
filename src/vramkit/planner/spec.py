"""What the planner plans for: the pipeline's components and their sizes (:class:`PipelineSpec`),
the request (:class:`Request`) and the budget (:class:`Budget`). Pure data; building a spec reads
shapes and dtypes of modules (meta tensors work) and changes nothing."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import InvalidRequestError, VramkitError
from ..memory.estimator import ComponentSizes, component_sizes

__all__ = [
    "StreamGeometry",
    "ComponentSpec",
    "PipelineSpec",
    "Request",
    "Budget",
    "KINDS",
    "MAX_SIDE",
    "spec_from_modules",
    "spec_from_model",
    "validate_size",
    "nearest_valid",
]

logger = logging.getLogger("vramkit")

#: Pipeline kinds: plain text-to-image, and those that also VAE-encode an input image.
KINDS = ("flux", "fill", "kontext", "controlnet", "img2img")
#: Largest height or width accepted.
MAX_SIDE = 8192
#: Storages the planner streams with (None = as loaded).
STREAM_STORAGES: tuple[str | None, ...] = (None, "bf16", "fp8", "int8")


@dataclass(frozen=True)
class StreamGeometry:
    """The block streaming engine's packed blocks of one component, per storage (shapes only)."""

    packed: Mapping[str | None, tuple[Any, Any, int]]
    #: The same packed as parts (``BlockStreaming(unit="part")``), per storage; empty when no block
    #: of the component splits into parts (T5's blocks, unknown block classes).
    parts: Mapping[str | None, tuple[Any, Any, int]] = field(default_factory=dict)

    def storages(self) -> tuple[str | None, ...]:
        return tuple(self.packed)

    def units(self, storage: str | None) -> tuple[str, ...]:
        """The streaming units the engine can use for ``storage``: ``("block",)`` or ``("block", "part")``."""
        return ("block", "part") if storage in self.parts else ("block",)


@dataclass(frozen=True)
class ComponentSpec:
    """One component: its exact sizes and, if the engine can stream it, its stream geometry."""

    sizes: ComponentSizes
    stream: StreamGeometry | None = None

    @property
    def name(self) -> str:
        return self.sizes.name


@dataclass(frozen=True)
class PipelineSpec:
    """The components of a pipeline (by pipeline attribute) and its kind and call defaults."""

    components: Mapping[str, ComponentSpec]
    kind: str = "flux"
    name: str = "flux"
    default_max_sequence_length: int = 512
    default_steps: int = 28
    default_height: int = 1024
    default_width: int = 1024
    #: passes of each distinct ControlNet per denoising step: 1, or for a FluxMultiControlNetModel of one
    #: union net one per control image (at least 2: a multi of one net exists to run several modes);
    #: the sizes already cover every distinct net of a multi-ControlNet.
    controls: int = 1
    #: whether the ControlNet is a FluxMultiControlNetModel (residuals summed across controls)
    multi_control: bool = False

    def get(self, name: str) -> ComponentSpec | None:
        return self.components.get(name)

    def sizes(self, name: str) -> ComponentSizes | None:
        c = self.components.get(name)
        return c.sizes if c is not None else None


def nearest_valid(value: int) -> int:
    """The multiple of 16 nearest ``value`` (halves round up; at least 16, at most :data:`MAX_SIDE`)."""
    return min(MAX_SIDE, max(16, (int(value) + 8) // 16 * 16))


def validate_size(height: int, width: int) -> None:
    """Raise :class:`InvalidRequestError` unless both sides are multiples of 16 in ``16..8192``."""
    for label, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidRequestError(f"{label} must be an int, got {v!r}.")
        if v <= 0:
            raise InvalidRequestError(f"{label}={v} must be positive (a multiple of 16, e.g. 1024).")
        if v > MAX_SIDE:
            raise InvalidRequestError(f"{label}={v} is larger than {MAX_SIDE}; FLUX needs at most {MAX_SIDE} px.")
    bad = [(label, v) for label, v in (("height", height), ("width", width)) if v % 16]
    if bad:
        what = " and ".join(f"{label}={v}" for label, v in bad)
        raise InvalidRequestError(
            f"{what} not a multiple of 16 (FLUX latents are packed 2x2 at 1/8 scale); "
            f"the nearest valid size is {nearest_valid(width)}x{nearest_valid(height)} (width x height)."
        )


@dataclass(frozen=True)
class Request:
    """One pipeline call to plan for. ``batch_size`` is ``num_images_per_prompt``; ``true_cfg``
    adds a negative-prompt pass per step; ``reference_tokens`` are Kontext's reference-image tokens
    (default: a ~1 MP reference, 4096 tokens)."""

    height: int = 1024
    width: int = 1024
    batch_size: int = 1
    max_sequence_length: int = 512
    num_inference_steps: int = 28
    true_cfg: bool = False
    reference_tokens: int | None = None

    def __post_init__(self) -> None:
        validate_size(self.height, self.width)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidRequestError(f"batch_size={self.batch_size!r} must be an int >= 1.")
        if self.batch_size > 64:
            raise InvalidRequestError(f"batch_size={self.batch_size} is more than 64; split the work into calls.")
        msl = self.max_sequence_length
        if isinstance(msl, bool) or not isinstance(msl, int) or not 1 <= msl <= 512:
            raise InvalidRequestError(f"max_sequence_length={msl!r} must be an int in 1..512.")
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidRequestError(f"num_inference_steps={steps!r} must be an int >= 1.")
        if self.reference_tokens is not None and (
            isinstance(self.reference_tokens, bool)
            or not isinstance(self.reference_tokens, int)
            or self.reference_tokens < 0
        ):
            raise InvalidRequestError(f"reference_tokens={self.reference_tokens!r} must be an int >= 0.")

    def with_(self, **changes: Any) -> Request:
        return replace(self, **changes)


@dataclass(frozen=True)
class Budget:
    """Memory and bandwidth to plan within. ``pinned`` bounds page-locked host memory (streamed
    blocks); ``device`` is the device type the plan is for (``"cuda"``, ``"mps"``);
    ``disk_bandwidth`` the read + copy rate of blocks streamed from disk (``None``: the
    calibration's assumed default); ``disk_free`` the free bytes in the offload folder, where
    streamed blocks and the originals of re-encoded weights may be written (``None``: unknown, not
    checked).

    ``devices``: per-device VRAM budgets ``(("cuda:0", bytes), ("cuda:1", bytes))`` to plan across
    several GPUs (``vram`` is then the first one's); empty for the usual one-device plan. RAM,
    pinned memory and bandwidth are the host's, shared by every device."""

    vram: int
    ram: int
    pinned: int
    bandwidth: float
    device: str = "cuda"
    bandwidth_source: str = "given"
    disk_bandwidth: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    devices: tuple[tuple[str, int], ...] = ()
    disk_free: int | None = None

    def with_vram(self, vram: int) -> Budget:
        return replace(self, vram=int(vram))


def _stream_geometry(module: torch.nn.Module) -> StreamGeometry | None:
    """The engine's packed blocks of ``module`` for each storage, or ``None`` when the engine cannot
    stream it (or is not importable)."""
    try:
        from ..engine.blocks import find_block_stacks
        from ..engine.layout import packed_blocks
    except ImportError as exc:
        logger.debug("block streaming engine not importable (%s): no streaming candidates", exc)
        return None
    stacks = find_block_stacks(module)
    if not stacks:
        return None
    floating = {p.dtype for p in module.parameters() if p.is_floating_point()}
    packed: dict[str | None, tuple[Any, Any, int]] = {}
    parts: dict[str | None, tuple[Any, Any, int]] = {}
    splits = _splits_into_parts(stacks)
    for storage in STREAM_STORAGES:
        if storage == "bf16" and not (floating - {torch.bfloat16, torch.float16}):
            continue  # 16-bit storage of a 16-bit model is the same as storage=None
        try:
            packed[storage] = packed_blocks(module, storage, stacks=stacks)
        except (VramkitError, RuntimeError, ValueError, TypeError) as exc:  # e.g. weights shared across blocks
            logger.debug("cannot stream %s with storage %s: %s", type(module).__name__, storage, exc)
            continue
        if splits:
            try:
                parts[storage] = packed_blocks(module, storage, stacks=stacks, unit="part")
            except (VramkitError, RuntimeError, ValueError, TypeError) as exc:  # e.g. a modified block
                logger.debug("cannot stream %s by parts with storage %s: %s", type(module).__name__, storage, exc)
    return StreamGeometry(packed=packed, parts=parts) if packed else None


def _splits_into_parts(stacks: list[tuple[str, torch.nn.Module]]) -> bool:
    """Whether streaming by parts differs from streaming by blocks: some block splits."""
    from ..engine.blocks import block_parts

    try:
        return any(block_parts(block) for _, stack in stacks for block in stack)
    except VramkitError as exc:  # a listed block class holding tensors outside its listed parts
        logger.debug("blocks cannot be streamed by parts: %s", exc)
        return False


def spec_from_modules(
    modules: Mapping[str, torch.nn.Module],
    kind: str = "flux",
    name: str = "flux",
    default_max_sequence_length: int = 512,
    default_steps: int = 28,
    default_height: int = 1024,
    default_width: int = 1024,
) -> PipelineSpec:
    """A :class:`PipelineSpec` from modules by pipeline attribute (``transformer``, ``vae``, ...).
    Reads shapes and dtypes only."""
    if kind not in KINDS:
        raise InvalidRequestError(f"unknown pipeline kind {kind!r}; use one of {KINDS}.")
    if "transformer" not in modules:
        raise InvalidRequestError("a FLUX pipeline spec needs a 'transformer' component.")
    comps: dict[str, ComponentSpec] = {}
    controls, multi_control = 1, False
    nets = getattr(modules.get("controlnet"), "nets", None)
    if isinstance(nets, torch.nn.ModuleList) and len(nets) > 0:
        multi_control = True
        distinct = len({id(n) for n in nets})
        # Passes of each distinct net per step: a net listed n times runs n times; a multi-ControlNet
        # of one union net runs once per control image (at least two, or it would not be a multi).
        controls = max(2, len(nets)) if distinct == 1 else max(1, len(nets) // distinct)
    from ..engine.blocks import STREAMABLE_COMPONENTS

    for attr, module in modules.items():
        sizes = component_sizes(attr, module)
        geometry = _stream_geometry(module) if attr in STREAMABLE_COMPONENTS else None
        comps[attr] = ComponentSpec(sizes=sizes, stream=geometry)
    return PipelineSpec(
        components=comps,
        kind=kind,
        name=name,
        default_max_sequence_length=default_max_sequence_length,
        default_steps=default_steps,
        default_height=default_height,
        default_width=default_width,
        controls=controls,
        multi_control=multi_control,
    )


def spec_from_model(model: str) -> PipelineSpec:
    """The spec of a full-size pipeline of :data:`~vramkit.memory.architectures.PIPELINE_MODELS`,
    built on the meta device (no weights, no GPU)."""
    from ..memory.architectures import PIPELINE_MODELS, build_architecture

    try:
        pm = PIPELINE_MODELS[model]
    except KeyError:
        raise InvalidRequestError(f"unknown model {model!r}; use one of {', '.join(PIPELINE_MODELS)}.") from None
    modules = {attr: build_architecture(arch) for attr, arch in pm.components}
    return spec_from_modules(
        modules,
        kind=pm.kind,
        name=pm.name,
        default_max_sequence_length=pm.max_sequence_length,
        default_steps=pm.num_inference_steps,
    )
