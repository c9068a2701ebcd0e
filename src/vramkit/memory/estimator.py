"""Exact weight bytes per component and storage format, and the activation, workspace and time model
of each stage (text encoding, one denoising step, VAE decode/encode).

Weights are counted, not estimated: :func:`component_sizes` walks a module's parameters and buffers
(meta tensors work: only shapes and dtypes are read) and tallies, per repeated block and for "the
rest", which tensors a storage format changes:

- ``"loaded"``: the bytes as they are now; ``"bf16"``/``"fp16"``: every floating tensor at 2 bytes.
- ``"fp8"`` (``StoreFP8`` / ``BlockStreaming(storage="fp8")``): as diffusers' layerwise casting, the
  weight *and bias* of every Linear/Conv layer whose name does not match ``pos_embed``,
  ``patch_embed``, ``norm``, ``^proj_in$`` or ``^proj_out$`` take 1 byte; norms (incl. the adaLN
  modulation linears, which live under ``norm*``), embeddings and the rest keep their dtype.
- ``"int8"`` (``Quantize("int8")`` / ``BlockStreaming(storage="int8")``): every Linear weight takes 1
  byte plus one scale per output row in the compute dtype; biases, norms, embeddings and convs stay.
- ``"nf4"``: every Linear weight takes half a byte plus a 4-byte absmax per 64 weights.

Activations and times come from :class:`~vramkit.memory.calibration.Calibration`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .calibration import Calibration

__all__ = [
    "FORMATS",
    "LOSSY_FORMATS",
    "ParamStats",
    "ComponentSizes",
    "component_sizes",
    "image_tokens",
    "transformer_flops",
    "transformer_compute_seconds",
    "transformer_activation_bytes",
    "controlnet_residual_bytes",
    "t5_activation_bytes",
    "text_encode_seconds",
    "vae_decode_bytes",
    "vae_decode_seconds",
    "vae_encode_bytes",
    "vae_encode_seconds",
    "vae_tiles",
    "compute_factor",
]

#: Storage formats the estimator knows.
FORMATS: tuple[str, ...] = ("loaded", "bf16", "fp16", "fp8", "int8", "nf4")
#: Formats that change numerics.
LOSSY_FORMATS: frozenset[str] = frozenset({"fp8", "int8", "nf4"})

_FP8_SKIP = re.compile(r"pos_embed|patch_embed|norm|^proj_in$|^proj_out$")
_FP8_LAYERS: tuple[type[torch.nn.Module], ...] = (
    torch.nn.Linear,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
    torch.nn.ConvTranspose1d,
    torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d,
)
_NF4_BLOCK = 64

#: Module lists holding a component's repeated blocks, by family, in execution order ("a|b": the
#: first of the alternatives that exists; transformers 5 flattened CLIPTextModel).
_BLOCK_LISTS: dict[str, tuple[str, ...]] = {
    "flux-transformer": ("transformer_blocks", "single_transformer_blocks"),
    "flux-controlnet": ("transformer_blocks", "single_transformer_blocks"),
    "t5": ("encoder.block",),
    "clip": ("text_model.encoder.layers|encoder.layers",),
    "vae": (),
    "other": (),
}


@dataclass(frozen=True)
class ParamStats:
    """Tallies of one group of tensors (one block, or everything outside the blocks)."""

    float_numel: int = 0
    float_bytes: int = 0  # floating tensors as loaded
    other_bytes: int = 0  # non-floating buffers (kept as they are)
    fp8_numel: int = 0
    fp8_loaded_bytes: int = 0
    lin_numel: int = 0  # Linear weights (int8 / nf4)
    lin_loaded_bytes: int = 0
    lin_rows: int = 0
    lin_nf4_blocks: int = 0
    scale_itemsize: int = 2

    def bytes(self, fmt: str = "loaded") -> int:
        """Bytes of this group stored in ``fmt`` (one of :data:`FORMATS`)."""
        if fmt == "loaded":
            return self.float_bytes + self.other_bytes
        if fmt in ("bf16", "fp16"):
            return 2 * self.float_numel + self.other_bytes
        if fmt == "fp8":
            return self.fp8_numel + (self.float_bytes - self.fp8_loaded_bytes) + self.other_bytes
        if fmt == "int8":
            return (
                self.lin_numel
                + self.lin_rows * self.scale_itemsize
                + (self.float_bytes - self.lin_loaded_bytes)
                + self.other_bytes
            )
        if fmt == "nf4":
            return (
                (self.lin_numel + 1) // 2
                + 4 * self.lin_nf4_blocks
                + (self.float_bytes - self.lin_loaded_bytes)
                + self.other_bytes
            )
        raise ValueError(f"unknown storage format {fmt!r}; use one of {FORMATS}")

    def __add__(self, other: ParamStats) -> ParamStats:
        return ParamStats(
            float_numel=self.float_numel + other.float_numel,
            float_bytes=self.float_bytes + other.float_bytes,
            other_bytes=self.other_bytes + other.other_bytes,
            fp8_numel=self.fp8_numel + other.fp8_numel,
            fp8_loaded_bytes=self.fp8_loaded_bytes + other.fp8_loaded_bytes,
            lin_numel=self.lin_numel + other.lin_numel,
            lin_loaded_bytes=self.lin_loaded_bytes + other.lin_loaded_bytes,
            lin_rows=self.lin_rows + other.lin_rows,
            lin_nf4_blocks=self.lin_nf4_blocks + other.lin_nf4_blocks,
            scale_itemsize=max(self.scale_itemsize, other.scale_itemsize),
        )


@dataclass(frozen=True)
class ComponentSizes:
    """Exact sizes of one pipeline component, by repeated block and "the rest".

    ``hidden``, ``heads`` and ``layers`` describe the attention stack (transformer, ControlNet,
    T5); ``channels`` the VAE's first block width. ``params`` counts parameters (tied ones once).
    """

    name: str
    family: str
    dtype: str
    params: int
    blocks: tuple[ParamStats, ...]
    rest: ParamStats
    largest_leaf_bytes: int
    hidden: int = 0
    heads: int = 0
    layers: int = 0
    channels: int = 0
    extra: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    @property
    def itemsize(self) -> int:
        return {"fp32": 4, "bf16": 2, "fp16": 2}.get(self.dtype, 2)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def total(self) -> ParamStats:
        total = self.rest
        for b in self.blocks:
            total = total + b
        return total

    def weight_bytes(self, fmt: str = "loaded") -> int:
        """All weights (and buffers) stored in ``fmt``."""
        return self.rest.bytes(fmt) + sum(b.bytes(fmt) for b in self.blocks)

    def block_bytes(self, fmt: str = "loaded") -> tuple[int, ...]:
        """Bytes of each repeated block in execution order, stored in ``fmt``."""
        return tuple(b.bytes(fmt) for b in self.blocks)

    def rest_bytes(self, fmt: str = "loaded") -> int:
        """Bytes outside the repeated blocks (embeddings, final norm, projections)."""
        return self.rest.bytes(fmt)

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.extra).get(key, default)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, "bf16")


def _family(module: torch.nn.Module) -> str:
    cls = type(module).__name__
    if cls == "FluxTransformer2DModel":
        return "flux-transformer"
    if cls in ("FluxControlNetModel", "FluxMultiControlNetModel"):
        return "flux-controlnet"
    if cls.startswith("T5"):
        return "t5"
    if cls.startswith("CLIPText"):
        return "clip"
    if cls in ("AutoencoderKL", "AutoencoderTiny"):
        return "vae"
    return "other"


def _resolve(module: torch.nn.Module, dotted: str) -> Any:
    obj: Any = module
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _block_modules(module: torch.nn.Module, family: str) -> list[torch.nn.Module]:
    roots = list(getattr(module, "nets", [])) if type(module).__name__ == "FluxMultiControlNetModel" else [module]
    # A net listed twice (several modes of one union ControlNet) is one set of weights.
    roots = list({id(r): r for r in roots}.values())
    blocks: list[torch.nn.Module] = []
    for root in roots:
        for paths in _BLOCK_LISTS.get(family, ()):
            for path in paths.split("|"):  # alternatives: the first that exists
                found = _resolve(root, path)
                if isinstance(found, torch.nn.ModuleList):
                    blocks.extend(found)
                    break
    return blocks


class _Tally:
    def __init__(self) -> None:
        self.v: dict[str, int] = dict.fromkeys(
            (
                "float_numel",
                "float_bytes",
                "other_bytes",
                "fp8_numel",
                "fp8_loaded_bytes",
                "lin_numel",
                "lin_loaded_bytes",
                "lin_rows",
                "lin_nf4_blocks",
            ),
            0,
        )
        self.scale_itemsize = 2

    def freeze(self) -> ParamStats:
        return ParamStats(**self.v, scale_itemsize=self.scale_itemsize)


def component_sizes(name: str, module: torch.nn.Module) -> ComponentSizes:
    """Count ``module``'s tensors by block and storage format. Reads shapes and dtypes only: works on
    the meta device, changes nothing."""
    family = _family(module)
    blocks = _block_modules(module, family)
    owner: dict[int, int] = {}
    for index, block in enumerate(blocks):
        for sub in block.modules():
            owner.setdefault(id(sub), index)
    tallies = [_Tally() for _ in blocks]
    rest = _Tally()
    seen: set[int] = set()
    params = 0
    dtype_count: dict[torch.dtype, int] = {}
    largest_leaf = 0
    for qual, sub in module.named_modules():
        group = tallies[owner[id(sub)]] if id(sub) in owner else rest
        # LoRA adapters are never stored in fp8 or int8 (vramkit skips them), so count them as loaded.
        is_lora = any(part.startswith("lora_") for part in qual.split("."))
        is_fp8_layer = isinstance(sub, _FP8_LAYERS) and _FP8_SKIP.search(qual) is None and not is_lora
        is_linear = isinstance(sub, torch.nn.Linear) and not is_lora
        leaf_bytes = 0
        tensors: Iterable[tuple[str, torch.Tensor | None, bool]] = [
            *((n, t, True) for n, t in sub._parameters.items()),
            *((n, t, False) for n, t in sub._buffers.items()),
        ]
        for tname, tensor, is_param in tensors:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            numel = tensor.numel()
            nbytes = numel * tensor.element_size()
            leaf_bytes += nbytes
            v = group.v
            if not tensor.is_floating_point():
                v["other_bytes"] += nbytes
                continue
            if is_param:
                params += numel
                dtype_count[tensor.dtype] = dtype_count.get(tensor.dtype, 0) + numel
            v["float_numel"] += numel
            v["float_bytes"] += nbytes
            if is_param and is_fp8_layer:
                v["fp8_numel"] += numel
                v["fp8_loaded_bytes"] += nbytes
            if is_param and is_linear and tname == "weight" and tensor.dim() == 2:
                v["lin_numel"] += numel
                v["lin_loaded_bytes"] += nbytes
                v["lin_rows"] += int(tensor.shape[0])
                v["lin_nf4_blocks"] += math.ceil(numel / _NF4_BLOCK)
                group.scale_itemsize = tensor.element_size()
        largest_leaf = max(largest_leaf, leaf_bytes)
    dtype = max(dtype_count, key=lambda d: dtype_count[d]) if dtype_count else torch.bfloat16
    hidden = heads = layers = channels = 0
    extra: dict[str, Any] = {}
    config = getattr(module, "config", None)
    if family in ("flux-transformer", "flux-controlnet"):
        cfg = config if type(module).__name__ != "FluxMultiControlNetModel" else module.nets[0].config
        heads = int(cfg.num_attention_heads)
        hidden = heads * int(cfg.attention_head_dim)
        layers = len(blocks)
        extra["num_double"] = sum(int(getattr(n, "config", cfg).num_layers) for n in getattr(module, "nets", [module]))
        extra["num_single"] = sum(
            int(getattr(n, "config", cfg).num_single_layers) for n in getattr(module, "nets", [module])
        )
        extra["in_channels"] = int(cfg.in_channels)
        extra["num_nets"] = len(getattr(module, "nets", [module]))
    elif family == "t5" and config is not None:
        hidden, heads, layers = int(config.d_model), int(config.num_heads), len(blocks)
    elif family == "clip" and config is not None:
        hidden, heads, layers = int(config.hidden_size), int(config.num_attention_heads), len(blocks)
    elif family == "vae" and config is not None:
        channels = int(config.block_out_channels[0])
        extra["scale"] = 2 ** (len(config.block_out_channels) - 1)
    return ComponentSizes(
        name=name,
        family=family,
        dtype=_dtype_name(dtype),
        params=params,
        blocks=tuple(t.freeze() for t in tallies),
        rest=rest.freeze(),
        largest_leaf_bytes=largest_leaf,
        hidden=hidden,
        heads=heads,
        layers=layers,
        channels=channels,
        extra=tuple(sorted(extra.items())),
    )


# ------------------------------------------------------------------------------------------------
# Activations, workspaces and times
# ------------------------------------------------------------------------------------------------


def image_tokens(height: int, width: int) -> int:
    """Transformer image tokens: latents are H/8 x W/8, packed 2x2."""
    return (height // 16) * (width // 16)


def compute_factor(cal: Calibration, fmt: str, *, streamed: bool = False, loaded_dtype: str = "bf16") -> float:
    """Compute slowdown of a storage format against bf16 resident weights (``fp8``: diffusers'
    layerwise casting; ``int8``/``nf4``: weight-only quantized matmuls). Streamed blocks are decoded
    to their loaded dtype first, so only the loaded dtype matters for them (``streamed=True``)."""
    if streamed:
        return cal.fp32_compute_factor if loaded_dtype == "fp32" else 1.0
    base = cal.fp32_compute_factor if (fmt == "loaded" and loaded_dtype == "fp32") else 1.0
    if fmt == "fp8":
        return cal.fp8_compute_factor
    if fmt == "int8":
        return cal.int8_compute_factor
    if fmt == "nf4":
        return cal.nf4_compute_factor
    return base


def transformer_flops(sizes: ComponentSizes, batch: int, tokens: int) -> float:
    """FLOPs of one forward: 2 per parameter per token, plus attention (QK^T and AV: 4 N^2 d per layer)."""
    return batch * (2.0 * sizes.params * tokens + 4.0 * tokens * tokens * sizes.hidden * sizes.layers)


def transformer_compute_seconds(cal: Calibration, sizes: ComponentSizes, batch: int, tokens: int) -> float:
    """Compute time of one forward with resident bf16 weights."""
    return (
        cal.step_overhead_s * (sizes.layers / 57.0 if sizes.layers else 1.0)
        + transformer_flops(sizes, batch, tokens) / cal.transformer_flops_per_s
    )


def transformer_activation_bytes(
    cal: Calibration,
    sizes: ComponentSizes,
    batch: int,
    tokens: int,
    *,
    materialized_scores: bool,
    chunk: int | None = None,
) -> int:
    """Activation + workspace peak of one forward: linear in tokens with flash/efficient attention;
    plus ``heads x chunk x tokens`` scores when the backend materializes them (query chunking of
    ``AttentionSlicing`` bounds ``chunk``)."""
    hidden_scale = (sizes.hidden or 3072) / 3072.0
    act = batch * tokens * cal.transformer_act_bytes_per_token * hidden_scale
    if materialized_scores:
        q = tokens if chunk is None else min(chunk, tokens)
        act += batch * sizes.heads * q * tokens * cal.attention_score_bytes
    return int(act)


def controlnet_residual_bytes(sizes: ComponentSizes, batch: int, img_tokens: int, text_tokens: int) -> int:
    """The ControlNet's block residuals kept for the transformer: one (batch, tokens, hidden) tensor
    per double block (image tokens) and per single block (image + text tokens), per net."""
    n_double = int(sizes.get("num_double", 0))
    n_single = int(sizes.get("num_single", 0))
    return int(sizes.itemsize * batch * sizes.hidden * (n_double * img_tokens + n_single * (img_tokens + text_tokens)))


def t5_activation_bytes(cal: Calibration, sizes: ComponentSizes, seq_len: int, batch: int = 1) -> int:
    """T5 encoder activation peak: linear part plus attention scores and position bias (fp32)."""
    hidden_scale = (sizes.hidden or 4096) / 4096.0
    head_scale = (sizes.heads or 64) / 64.0
    return int(
        batch
        * (
            seq_len * cal.t5_act_bytes_per_token * hidden_scale
            + seq_len * seq_len * cal.t5_act_bytes_per_token_sq * head_scale
        )
    )


def text_encode_seconds(
    cal: Calibration, t5: ComponentSizes | None, clip: ComponentSizes | None, seq_len: int
) -> float:
    """Compute time of one prompt encoding with the encoders on the GPU."""
    seconds = 0.0
    if t5 is not None:
        seconds += cal.t5_seconds_512 * (seq_len / 512.0) * (t5.params / 4.762e9)
    if clip is not None:
        seconds += cal.clip_seconds * (clip.params / 1.23e8)
    return seconds


def _vae_scale(sizes: ComponentSizes | None) -> float:
    if sizes is None:
        return 1.0
    return (sizes.channels or 128) / 128.0 * (sizes.itemsize / 2.0)


def vae_tiles(height: int, width: int, tile: int, overlap: float = 0.25) -> int:
    """Tiles diffusers' tiled decode uses: a ``tile`` stepping by ``tile*(1-overlap)`` over the image."""
    stride = max(8, int(tile * (1.0 - overlap)))
    return math.ceil(height / stride) * math.ceil(width / stride)


def vae_decode_bytes(
    cal: Calibration,
    sizes: ComponentSizes | None,
    height: int,
    width: int,
    batch: int,
    *,
    tile: int | None = None,
    slicing: bool = False,
) -> int:
    """Decode peak (activations, outputs) for ``batch`` images; tiling bounds the activations to one
    tile, slicing to one image at a time."""
    per_px = cal.vae_decode_bytes_per_pixel * _vae_scale(sizes)
    at_once = 1 if slicing else batch
    itemsize = sizes.itemsize if sizes is not None else 2
    outputs = batch * 3 * height * width * itemsize
    if tile is not None and max(height, width) > tile:
        side_h, side_w = min(tile, height), min(tile, width)
        return int(at_once * per_px * side_h * side_w + 3 * outputs)
    return int(at_once * per_px * height * width + 2 * outputs)


def vae_decode_seconds(
    cal: Calibration, height: int, width: int, batch: int, *, tile: int | None = None, overlap: float = 0.25
) -> float:
    """Decode time of ``batch`` images (tiling decodes overlapping tiles, one launch each)."""

    def one(px: float) -> float:
        return cal.vae_decode_seconds_1mp * (px / 1048576.0) ** cal.vae_decode_time_exponent

    if tile is not None and max(height, width) > tile:
        n = vae_tiles(height, width, tile, overlap)
        return batch * n * (one(min(tile, height) * min(tile, width)) + cal.vae_tile_overhead_s)
    return batch * one(height * width)


def vae_encode_bytes(
    cal: Calibration, sizes: ComponentSizes | None, height: int, width: int, batch: int, *, tile: int | None = None
) -> int:
    """Encode peak of ``batch`` input images (Fill, Kontext, ControlNet conditioning)."""
    per_px = cal.vae_encode_bytes_per_pixel * _vae_scale(sizes)
    if tile is not None and max(height, width) > tile:
        return int(batch * per_px * min(tile, height) * min(tile, width))
    return int(batch * per_px * height * width)


def vae_encode_seconds(cal: Calibration, height: int, width: int, batch: int) -> float:
    return batch * cal.vae_encode_seconds_1mp * (height * width / 1048576.0)
