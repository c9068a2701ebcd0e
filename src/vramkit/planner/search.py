"""The plan search: enumerate candidate placements analytically, predict each one's peak VRAM and
RAM per stage and its time, drop those that do not fit, return the fastest.

A *family* fixes the storage format of the transformer (and ControlNet), where it lives (resident,
block-streamed, model-offloaded; or everything sequentially offloaded), where its streamed blocks
live on the host (RAM, or a memory-mapped offload file on disk when the weights do not fit the RAM
budget) and where the text encoders live (resident, released between prompts by ``PromptCache``,
T5 block-streamed from RAM or from disk) and whether streamed blocks go as whole blocks or by parts.
Within a family the search tries every count of resident blocks (by parts: every fourth count of
resident parts, then every count between two tried counts bounded differently, e.g. one over the
RAM and the next over the VRAM, and every count next to the best, or to the closest when none
fits), and for each picks the fastest VAE decode option (plain, ``VaeSlicing``, ``VaeTiling``) and
attention chunk that fit. Options only get added as the budget grows, so more VRAM should never
give a slower plan (exactly so for whole blocks; by parts the strided search is checked against an
exhaustive one in the tests).

Blocks streamed from RAM in fp8/int8 (or cast) keep the original values of their re-encoded weights
for an exact restore: in host RAM (``BlockStreaming(originals="ram")``, fastest to apply and
restore) unless that would take the plan's host RAM past :data:`RAM_BOUND` times the RAM the
pipeline's weights take, or past the RAM budget; then they go to a file in the offload folder
(``originals="disk"``), if its free disk space (``Budget.disk_free``, when known) holds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import InvalidRequestError, PlanInfeasibleError
from ..memory.budget import format_bytes
from ..memory.calibration import Calibration
from ..memory.estimator import (
    ComponentSizes,
    compute_factor,
    controlnet_residual_bytes,
    image_tokens,
    t5_activation_bytes,
    text_encode_seconds,
    transformer_activation_bytes,
    transformer_compute_seconds,
    vae_decode_bytes,
    vae_decode_seconds,
    vae_encode_bytes,
    vae_encode_seconds,
    vae_tiles,
)
from ..plan import Plan, PlanStep, Predicted, Rejected, StagePrediction
from .spec import Budget, ComponentSpec, PipelineSpec, Request

__all__ = ["QUALITIES", "RAM_BOUND", "search", "Family", "Candidate", "pipeline_weights"]

#: Accepted ``quality`` values: ``"lossless"`` (bit-identical output) and ``"auto"`` (also fp8/int8
#: weights and VAE tiling when they are faster or needed).
QUALITIES = ("lossless", "auto")

_TILES = (1024, 768, 512, 256)
_CHUNKS = (4096, 2048, 1024, 512, 256)
_STORAGE_OF = {"loaded": None, "bf16": "bf16", "fp8": "fp8", "int8": "int8"}
_PREFETCH = 1
#: Every how many resident counts a family streamed by parts is first tried (then refined, see _run).
_PART_STRIDE = 4
#: A plan's peak host RAM should stay within this multiple of the RAM the pipeline's weights take
#: (optimizing must not grow host RAM by more than 10 %): past it, streamed blocks in fp8/int8 keep
#: the originals of their re-encoded weights in an offload file instead of host RAM.
RAM_BOUND = 1.1


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def pipeline_weights(spec: PipelineSpec) -> int:
    """Bytes of every component's weights as loaded: the RAM a pipeline loaded on the CPU takes."""
    return sum(c.sizes.weight_bytes("loaded") for c in spec.components.values())


@dataclass(frozen=True)
class Family:
    """Everything a candidate fixes except the resident block count and the VAE/attention options."""

    fmt: str  # transformer (and ControlNet) weights: loaded, bf16, fp8, int8
    place: str  # resident, stream, offload, sequential
    te: str  # text encoders: resident, cache, stream, stream_parked, stream_disk, none, sequential
    host: str = "ram"  # where streamed transformer/ControlNet blocks live: ram, disk (offload file)
    unit: str = "block"  # what streams as one piece: whole blocks, or each block's parts

    def describe(self) -> str:
        if self.place == "sequential":
            return "SequentialOffload of every component"
        fmt = {"loaded": "as loaded", "bf16": "bf16", "fp8": "fp8", "int8": "int8"}[self.fmt]
        place = {"resident": "resident", "stream": "block-streamed", "offload": "model-offloaded"}[self.place]
        if self.place == "stream" and self.host == "disk":
            place = "block-streamed from disk"
        if self.place == "stream" and self.unit == "part":
            place += " by parts"
        te = {
            "resident": "text encoders resident",
            "cache": "text encoders released after encoding (PromptCache)",
            "stream": "T5 block-streamed",
            "stream_parked": "T5 block-streamed, both text encoders parked between prompts",
            "stream_disk": "T5 block-streamed from disk",
            "none": "no text encoders",
        }[self.te]
        return f"transformer {fmt} {place}, {te}"


@dataclass(frozen=True)
class _Geo:
    device: int
    streamed: int
    retained: int
    decoded: int
    n_streamed: int
    n_resident: int
    resident_bytes: int
    slots: int
    slot_bytes: int
    scratch: int
    blocks: tuple[int, ...]  # packed bytes of each streamed block, in execution order
    rest: int = 0  # the module outside its blocks (stays on the device when the streamer parks)


@dataclass(frozen=True)
class _VaeOpt:
    tile: int | None
    slicing: bool
    seconds: float
    dec_bytes: int
    enc_bytes: int

    @property
    def n_steps(self) -> int:
        return int(self.tile is not None) + int(self.slicing)


@dataclass
class Candidate:
    """One evaluated candidate (a family with its resident counts and chosen options)."""

    family: Family
    r_t: int = 0
    r_c: int = 0
    vae: _VaeOpt | None = None
    chunk: int | None = None
    stages: dict[str, StagePrediction] = field(default_factory=dict)
    peak_vram: int = 0
    min_peak_vram: int = 0
    ram: int = 0
    pinned: int = 0
    step_seconds: float = 0.0
    call_seconds: float = 0.0
    lossless: bool = True
    n_steps: int = 0
    fits: bool = False
    why_not: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def key(self) -> tuple[float, int, int, int]:
        return (self.call_seconds, int(not self.lossless), self.n_steps, self.peak_vram)

    def describe(self, ctx: _Ctx) -> str:
        text = self.family.describe()
        if self.family.place == "stream":
            fam = self.family
            what = "parts" if fam.unit == "part" else "blocks"
            n_t = ctx.n_blocks("transformer", fam.fmt, fam.unit)
            counts = f"{self.r_t}/{n_t} {what} resident"
            if ctx.cn is not None:
                counts += f", ControlNet {self.r_c}/{ctx.n_blocks('controlnet', fam.fmt, fam.unit)}"
            streamed = "block-streamed from disk" if fam.host == "disk" else "block-streamed"
            if fam.unit == "part":
                streamed += " by parts"
            text = text.replace(streamed + ",", f"{streamed} ({counts}),", 1)
        if self.vae is not None and self.vae.tile:
            text += f", VAE tiles {self.vae.tile}px"
        if self.vae is not None and self.vae.slicing:
            text += ", VAE slicing"
        if self.chunk:
            text += f", attention chunk {self.chunk}"
        return text


class _Ctx:
    """Everything fixed for one search: the request, budget, constants and precomputed sizes."""

    def __init__(
        self,
        spec: PipelineSpec,
        req: Request,
        budget: Budget,
        quality: str,
        cal: Calibration,
        streaming: bool,
        parts: bool = True,
        weights_ram: int | None = None,
    ) -> None:
        self.spec, self.req, self.budget, self.quality, self.cal = spec, req, budget, quality, cal
        self.streaming = streaming
        # Whether streaming by parts may be planned (not with Compile: the compiled block forward
        # would trace the part hooks).
        self.parts = parts
        t = spec.get("transformer")
        if t is None:
            raise InvalidRequestError("the pipeline has no transformer to plan for.")
        self.t: ComponentSpec = t
        self.cn = spec.get("controlnet")
        self.clip = spec.get("text_encoder")
        self.t5 = spec.get("text_encoder_2")
        self.vae = spec.get("vae")
        known = {"transformer", "controlnet", "text_encoder", "text_encoder_2", "vae"}
        self.others = [c for n, c in spec.components.items() if n not in known]
        self.B = req.batch_size * (2 if (req.true_cfg and cal.true_cfg_batched) else 1)
        self.passes = 2 if (req.true_cfg and not cal.true_cfg_batched) else 1
        self.te_passes = 2 if req.true_cfg else 1
        self.img_tokens = image_tokens(req.height, req.width)
        self.text_tokens = req.max_sequence_length
        ref = req.reference_tokens if req.reference_tokens is not None else (4096 if spec.kind == "kontext" else 0)
        self.ref_tokens = ref
        self.tokens = self.img_tokens + self.text_tokens + ref
        self.materialized = budget.device.split(":")[0] in ("mps", "cpu") or cal.cuda_attention_materializes_scores
        self._geo: dict[tuple[str, str | None, int, str], _Geo] = {}
        # Bytes per component and format.
        self.W: dict[tuple[str, str], int] = {}
        self.pageable = cal.pageable_bandwidth
        self.bw = budget.bandwidth
        given = budget.disk_bandwidth is not None
        self.disk_bw = float(budget.disk_bandwidth) if given else cal.disk_bandwidth  # type: ignore[arg-type]
        self.disk_source = "given" if given else "assumed: calibration default, not measured"
        # What the whole pipeline's weights take as loaded (a search over some of its components,
        # as on one device of several, is given the whole pipeline's): RAM_BOUND times it bounds
        # the host RAM before the originals of re-encoded weights go to disk.
        self.weights_ram = pipeline_weights(spec) if weights_ram is None else int(weights_ram)

    @property
    def ram_bound(self) -> int:
        return int(RAM_BOUND * self.weights_ram)

    # --- sizes ----------------------------------------------------------------------------------

    def w(self, comp: ComponentSpec | None, fmt: str = "loaded") -> int:
        if comp is None:
            return 0
        key = (comp.name, fmt)
        if key not in self.W:
            self.W[key] = comp.sizes.weight_bytes(fmt)
        return self.W[key]

    def can_stream(self, comp: ComponentSpec | None, fmt: str) -> bool:
        return (
            self.streaming and comp is not None and comp.stream is not None and _STORAGE_OF[fmt] in comp.stream.packed
        )

    def can_stream_parts(self, comp: ComponentSpec | None, fmt: str) -> bool:
        return (
            self.parts
            and self.can_stream(comp, fmt)
            and comp is not None
            and comp.stream is not None
            and "part" in comp.stream.units(_STORAGE_OF[fmt])
        )

    def n_blocks(self, name: str, fmt: str, unit: str = "block") -> int:
        """Streaming units of component ``name``: its blocks, or with ``unit="part"`` its parts."""
        comp = self.spec.get(name)
        if comp is None:
            return 0
        storage = _STORAGE_OF.get(fmt)
        if comp.stream is not None and storage in comp.stream.packed:
            table = comp.stream.parts if unit == "part" and storage in comp.stream.parts else comp.stream.packed
            return len(table[storage][1])
        return comp.sizes.num_blocks

    def geo(self, comp: ComponentSpec, fmt: str, resident: int, unit: str = "block") -> _Geo:
        storage = _STORAGE_OF[fmt]
        key = (comp.name, storage, resident, unit)
        found = self._geo.get(key)
        if found is not None:
            return found
        from ..engine.layout import layout_from_blocks

        assert comp.stream is not None
        table = comp.stream.parts if unit == "part" else comp.stream.packed
        stacks, packed, rest = table[storage]
        lay = layout_from_blocks(stacks, packed, rest, resident, _PREFETCH, storage, None, unit=unit)
        g = _Geo(
            device=lay.device_nbytes,
            streamed=lay.streamed_nbytes,
            retained=lay.retained_nbytes,
            decoded=sum(b.original_nbytes for b in lay.blocks if b.encoded),
            n_streamed=len(lay.streamed_positions),
            n_resident=len(lay.resident_positions),
            resident_bytes=lay.resident_nbytes,
            slots=lay.num_slots,
            slot_bytes=lay.slot_nbytes,
            scratch=lay.scratch_nbytes,
            blocks=tuple(b.nbytes for b in lay.blocks if not b.resident),
            rest=lay.rest_nbytes,
        )
        self._geo[key] = g
        return g

    # --- model pieces ---------------------------------------------------------------------------

    def pad(self, raw: float) -> int:
        return int(raw * (1.0 + self.cal.allocator_reserve_fraction)) + int(self.cal.allocator_reserve_bytes)

    def unpad(self, padded: int) -> int:
        """The allocated estimate inside a padded figure: what ``max_memory_allocated`` should read.
        Predictions report it; fitting keeps the allocator reserve on top."""
        reserve = int(self.cal.allocator_reserve_bytes)
        return max(0, int((padded - reserve) / (1.0 + self.cal.allocator_reserve_fraction)))

    def smooth(self, compute: float, copy: float) -> float:
        if copy <= 0:
            return compute
        if compute <= 0:
            return copy
        p = self.cal.stream_overlap_exponent
        hi = max(compute, copy)
        return hi * ((compute / hi) ** p + (copy / hi) ** p) ** (1.0 / p)

    def compute(self, sizes: ComponentSizes, tokens: int, chunk: int | None) -> float:
        c = transformer_compute_seconds(self.cal, sizes, self.B, tokens)
        if chunk is not None and chunk < tokens:
            c += (math.ceil(tokens / chunk) - 1) * sizes.layers * self.cal.attention_chunk_overhead_s * self.B
        return c

    def activations(self, chunk: int | None) -> int:
        act = transformer_activation_bytes(
            self.cal, self.t.sizes, self.B, self.tokens, materialized_scores=self.materialized, chunk=chunk
        )
        if self.cn is not None:
            # The ControlNet runs first; its residuals stay for the transformer. While it runs, the block
            # outputs and their projected residuals both exist (calibrate.py: +1.07 GB at 1024^2).
            resid = controlnet_residual_bytes(self.cn.sizes, self.B, self.img_tokens, self.text_tokens)
            cn_act = transformer_activation_bytes(
                self.cal,
                self.cn.sizes,
                self.B,
                self.img_tokens + self.text_tokens,
                materialized_scores=self.materialized,
                chunk=chunk,
            )
            if self.spec.controls > 1 or self.spec.multi_control:
                # Several controls (diffusers' multi-ControlNet): the residuals summed so far stay while
                # the next pass collects, projects and scales its own, then the sum builds a new list
                # beside the two it adds.
                act = max(act + resid, cn_act + self.cal.multi_control_residual_copies * resid)
            else:
                act = max(act + resid, cn_act + 2 * resid)
        latents = self.B * self.img_tokens * 64 * 4 * 3  # latents, noise prediction, scheduler copy (fp32)
        return act + latents

    def t5_act(self) -> int:
        return t5_activation_bytes(self.cal, self.t5.sizes, self.text_tokens) if self.t5 is not None else 0

    def te_compute(self) -> float:
        return text_encode_seconds(
            self.cal,
            self.t5.sizes if self.t5 is not None else None,
            self.clip.sizes if self.clip is not None else None,
            self.text_tokens,
        )

    def needs_encode(self) -> bool:
        return self.spec.kind in ("fill", "kontext", "controlnet", "img2img")

    def encode_side(self) -> tuple[int, int]:
        if self.spec.kind == "kontext":
            return 1024, 1024
        return self.req.height, self.req.width

    def vae_options(self) -> list[_VaeOpt]:
        req, cal = self.req, self.cal
        vae_sizes = self.vae.sizes if self.vae is not None else None
        tiles: list[int | None] = [None]
        if self.quality != "lossless":
            tiles += [t for t in _TILES if t < max(req.height, req.width)]
        slicings = [False, True] if req.batch_size > 1 else [False]
        eh, ew = self.encode_side()
        opts = []
        for tile in tiles:
            for slicing in slicings:
                if self.vae is None:
                    opts.append(_VaeOpt(tile, slicing, 0.0, 0, 0))
                    continue
                dec = vae_decode_bytes(
                    cal, vae_sizes, req.height, req.width, req.batch_size, tile=tile, slicing=slicing
                )
                dec += req.batch_size * 16 * (req.height // 8) * (req.width // 8) * 4  # latents (fp32)
                sec = vae_decode_seconds(cal, req.height, req.width, req.batch_size, tile=tile)
                enc = 0
                if self.needs_encode():
                    enc = vae_encode_bytes(cal, vae_sizes, eh, ew, 1, tile=tile)
                    sec += vae_encode_seconds(cal, eh, ew, 1)
                opts.append(_VaeOpt(tile, slicing, sec, dec, enc))
        if self.vae is None:
            return opts[:1]
        opts.sort(key=lambda o: (o.seconds, o.n_steps))
        return opts

    def chunk_options(self) -> list[int | None]:
        if not self.materialized:
            return [None]
        return [None] + [c for c in _CHUNKS if c < self.tokens]


# ------------------------------------------------------------------------------------------------


def _families(ctx: _Ctx) -> list[Family]:
    fmts = ["loaded"]
    if ctx.quality != "lossless":
        if ctx.t.sizes.dtype == "fp32":
            fmts.append("bf16")
        fmts += ["fp8", "int8"]
    tes: list[str]
    if ctx.clip is None and ctx.t5 is None:
        tes = ["none"]
    else:
        tes = ["resident", "cache"]
        if ctx.can_stream(ctx.t5, "loaded"):
            tes += ["stream", "stream_disk"]
            # The smallest budgets: the text encoders leave the GPU whole between prompts (T5's
            # embedding and CLIP too), so the VAE decode's activations fit beside the VAE alone.
            if ctx.can_stream(ctx.clip, "loaded"):
                tes.append("stream_parked")
    fams = []
    for fmt in fmts:
        places = ["resident", "offload"]
        if ctx.can_stream(ctx.t, fmt) and (ctx.cn is None or ctx.can_stream(ctx.cn, fmt)):
            places.append("stream")
        for place in places:
            if fmt == "int8" and place != "stream" and not _int8_backend_available():
                continue
            # Streamed blocks may also live in an offload file on disk: slower copies, but host RAM
            # then holds only the page cache of the blocks in flight (for weights the RAM cannot hold).
            for host in ("ram", "disk") if place == "stream" else ("ram",):
                for te in tes:
                    fams.append(Family(fmt, place, te, host))
                    # By parts, the ring slots hold the largest part instead of the largest block:
                    # memory that can keep more of the model resident (from RAM only: from disk the
                    # copies, not the residency, set the step time).
                    if (
                        place == "stream"
                        and host == "ram"
                        and ctx.can_stream_parts(ctx.t, fmt)
                        and (ctx.cn is None or ctx.can_stream_parts(ctx.cn, fmt))
                    ):
                        fams.append(Family(fmt, place, te, host, unit="part"))
    fams.append(Family("loaded", "sequential", "sequential"))
    return fams


def _int8_backend_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def _resident_counts(ctx: _Ctx, fam: Family, stride: int = 1) -> list[tuple[int, int]]:
    """``(transformer, controlnet)`` resident unit counts to try for a streamed family: every
    ``stride``-th total (always including 0 and the top)."""
    if fam.place != "stream":
        return [(0, 0)]
    n_t = ctx.n_blocks("transformer", fam.fmt, fam.unit)
    n_c = ctx.n_blocks("controlnet", fam.fmt, fam.unit) if ctx.cn is not None else 0
    top = n_t + n_c if fam.fmt in ("fp8", "int8", "bf16") else n_t + n_c - 1
    totals = sorted(set(range(0, top + 1, stride)) | {top})
    out = []
    for total in totals:
        r_c = min(total, n_c)
        out.append((total - r_c, r_c))
    return out


def _place_originals(ctx: _Ctx, ram: int, retained: int, disk_need: int) -> tuple[str, str]:
    """Where the originals (``retained`` bytes) of re-encoded weights of blocks streamed from RAM
    wait for restore: ``"ram"`` or ``"disk"`` (the offload folder), with, when they stay in RAM past
    the bound, why. ``ram`` is the plan's host RAM without them; ``disk_need`` what the plan already
    writes to the offload folder.

    In RAM (fastest to apply and restore, nothing written) while the plan's RAM stays within
    :data:`RAM_BOUND` times the pipeline's weights and within the budget; else on disk, when the free
    disk space (if known) holds them: the offload file costs only page cache.
    """
    if retained <= 0:
        return "ram", ""
    with_them = ram + retained
    if with_them <= ctx.ram_bound and with_them <= ctx.budget.ram:
        return "ram", ""
    free = ctx.budget.disk_free
    if free is not None and disk_need + retained > free:
        return "ram", (
            f"the originals of the re-encoded weights ({_gb(retained)}) stay in host RAM, because the offload "
            f"folder has only {format_bytes(max(0, free - disk_need))} free"
        )
    return "disk", ""


def originals_beside(ctx: _Ctx, cand: Candidate, ram_beside: int) -> Candidate:
    """``cand`` as part of a plan whose other parts (text encoders on another device) take
    ``ram_beside`` more host RAM: itself when its originals may stay where they are, else a copy that
    keeps them in the offload folder (the same placement rule on the whole plan's RAM)."""
    info = cand.info
    retained = int(info.get("retained", 0))
    if info.get("originals") != "ram" or retained <= 0 or ram_beside <= 0:
        return cand
    without = cand.ram - retained
    where, _ = _place_originals(ctx, without + ram_beside, retained, info["disk_need"])
    if where == "ram":
        return cand
    stages = {k: replace(st, ram=st.ram - retained) for k, st in cand.stages.items()}
    new_info = {
        **info,
        "originals": "disk",
        "originals_ram": without + ram_beside + retained,
        "originals_why_ram": "",
        "disk_need": info["disk_need"] + retained,
    }
    return replace(cand, ram=without, stages=stages, info=new_info)


def _originals_reason(ctx: _Ctx, cand: Candidate, name: str, g: _Geo, storage: str) -> str:
    """The sentence of the reason of ``name``'s streaming step on where the originals of its
    re-encoded weights wait for restore (empty when nothing is re-encoded)."""
    info = cand.info
    comp = ctx.spec.get(name)
    if not g.retained or cand.family.host == "disk" or comp is None:
        return ""
    dtype = comp.sizes.dtype
    if info.get("originals") == "disk":
        would = info["originals_ram"]
        over = []
        if would > ctx.ram_bound:
            over.append(
                f"over {RAM_BOUND:g}x the {format_bytes(ctx.weights_ram)} the pipeline's weights take "
                f"({format_bytes(ctx.ram_bound)})"
            )
        if would > ctx.budget.ram:
            over.append(f"over the {format_bytes(ctx.budget.ram)} RAM budget")
        return (
            f". The {dtype} originals ({_gb(g.retained)}) are kept in an offload file for an exact restore, so host "
            f"RAM holds only the {storage} copy: keeping them in RAM would take this plan's RAM to "
            f"{format_bytes(would)}, {' and '.join(over)}"
        )
    if info.get("originals_why_ram"):
        return f". {info['originals_why_ram'][0].upper()}{info['originals_why_ram'][1:]}"
    return (
        f". The {dtype} originals ({_gb(g.retained)}) stay in host RAM for an exact restore (the plan's RAM stays "
        f"within {RAM_BOUND:g}x the pipeline's weights and the budget)"
    )


def _disk_working_set(g: _Geo) -> int:
    """Host RAM a component streamed from an offload file needs: the page cache of the blocks in
    flight, one per ring slot (older pages are clean file pages the kernel drops under pressure)."""
    return g.slots * g.slot_bytes if g.n_streamed else 0


def _greedy_pinned(blocks: tuple[int, ...], limit: int) -> int:
    """Bytes the engine pins under ``limit``: streamed blocks in execution order, each pinned if it
    still fits (``engine.layout.layout_from_blocks`` does exactly this)."""
    total = 0
    for nb in blocks:
        if total + nb <= limit:
            total += nb
    return total


def _evaluate(
    ctx: _Ctx, fam: Family, r_t: int, r_c: int, vae_opts: list[_VaeOpt], chunks: list[int | None]
) -> Candidate:
    cal, req, budget = ctx.cal, ctx.req, ctx.budget
    cand = Candidate(family=fam, r_t=r_t, r_c=r_c)
    info: dict[str, Any] = {}
    persist = cal.runtime_workspace_bytes  # bytes on the GPU through every stage
    te_extra = 0  # bytes on the GPU during text encoding only
    den_extra = 0  # ... during the denoising steps only
    dec_extra = 0  # ... during VAE decode/encode only
    ram = cal.host_baseline_bytes
    pin_left = budget.pinned
    pinned = 0
    pageable_copy = 0  # streamed bytes that stay pageable (copied at pageable speed, not overlapped)
    disk_copy = 0  # streamed bytes read from an offload file (disk rate, not overlapped)
    disk_need = 0  # bytes the plan writes to the offload folder
    retained = 0  # originals of re-encoded weights of blocks streamed from RAM (RAM or offload file)
    te_seconds = 0.0
    load_seconds = 0.0
    stream_bytes = 0
    n_steps = 0
    factor = 1.0
    decode_s = 0.0
    w_clip, w_t5 = ctx.w(ctx.clip), ctx.w(ctx.t5)
    w_vae = ctx.w(ctx.vae)
    w_other = sum(ctx.w(c) for c in ctx.others)
    tokens = ctx.tokens
    cn_tokens = ctx.img_tokens + ctx.text_tokens

    if fam.place == "sequential":

        def leaf(*comps: ComponentSpec | None) -> int:
            return max((c.sizes.largest_leaf_bytes for c in comps if c is not None), default=0)

        ram += sum(ctx.w(c) for c in ctx.spec.components.values())
        # accelerate's sequential offload moves one leaf module's weights in right before it runs and
        # out right after (synchronously): a stage holds its component's largest leaf, not more
        # (calibrated: the H200 grid measured 0.28/0.50/2.42 GiB at 1024^2 where twice the largest
        # leaf of the whole pipeline on top over-predicted every stage by ~0.45 GiB).
        te_extra = leaf(ctx.clip, ctx.t5)
        den_extra = leaf(ctx.t, ctx.cn)
        dec_extra = leaf(ctx.vae)
        seq = cal.sequential_bandwidth
        te_seconds = ctx.te_passes * (ctx.te_compute() + (w_clip + w_t5) / seq)
        stream_bytes = ctx.w(ctx.t) + ctx.w(ctx.cn)
        n_steps = 1
        info["seq_bytes"] = stream_bytes
    else:
        parked = 0
        if fam.te == "stream_parked":
            # The parked text encoders' host copies (T5's rest, all of CLIP) are pinned before
            # anything streams: they are small, and the engine pins them whatever is left.
            assert ctx.clip is not None and ctx.t5 is not None
            gc = info["clip_geo"] = ctx.geo(ctx.clip, "loaded", ctx.n_blocks("text_encoder", "loaded"))
            parked = ctx.geo(ctx.t5, "loaded", 0).rest + gc.device
            if parked > pin_left:
                info["pin_problem"] = (
                    f"the text encoders' parked copies ({format_bytes(parked)}) do not fit the pinned memory budget "
                    f"({format_bytes(pin_left)})"
                )
            pin_left -= parked
        # --- transformer and ControlNet (first after those: they get the pinned memory first) ---
        fmt = fam.fmt
        if fmt == "bf16":
            n_steps += 1  # Precision
        if fam.place in ("resident", "offload"):
            factor = compute_factor(cal, fmt, loaded_dtype=ctx.t.sizes.dtype)
            wt = ctx.w(ctx.t, fmt) + ctx.w(ctx.cn, fmt)
            if fmt in ("fp8", "int8"):
                n_steps += 1
            if fam.place == "resident":
                persist += wt + w_vae
            else:
                den_extra = wt
                dec_extra = ctx.w(ctx.cn, fmt) + w_vae  # the ControlNet stays until the call ends
                load_seconds = 2 * (wt + w_vae) / ctx.pageable
                ram += wt + w_vae
                n_steps += 1
        else:  # stream
            parts = [("t", ctx.t, r_t)] + ([("c", ctx.cn, r_c)] if ctx.cn is not None else [])
            decoded = 0
            persist += w_vae
            for key, comp, r in parts:
                g = ctx.geo(comp, fmt, r, fam.unit)
                persist += g.device
                # A multi-ControlNet's blocks run (and stream) once per control.
                passes = ctx.spec.controls if key == "c" else 1
                stream_bytes += passes * g.streamed
                if fam.host == "disk":
                    # Packed blocks and the originals of encoded ones live in the offload file; RAM
                    # holds the page cache of the blocks being read and copied (one per slot).
                    ws = _disk_working_set(g)
                    ram += ws
                    disk_copy += passes * g.streamed
                    disk_need += g.streamed + g.retained
                    info[f"{key}_ws"] = ws
                    pin = 0
                else:
                    pin = _greedy_pinned(g.blocks, max(0, pin_left))
                    pin_left -= pin
                    # The originals are placed once the whole plan's RAM is known (below).
                    ram += g.streamed
                    retained += g.retained
                    pinned += pin
                    pageable_copy += passes * (g.streamed - pin)
                decoded += g.decoded
                info[f"{key}_geo"] = g
                info[f"{key}_pinned"] = pin
                if g.n_streamed or g.decoded:
                    n_steps += 1
            # The engine decodes every encoded block back to its loaded dtype before it runs.
            factor = compute_factor(cal, fmt, streamed=True, loaded_dtype=ctx.t.sizes.dtype)
            decode_s = decoded / cal.decode_bandwidth
        # --- text encoders ---
        if fam.te == "resident":
            persist += w_clip + w_t5
            te_seconds = ctx.te_passes * ctx.te_compute()
        elif fam.te == "cache":
            te_extra = w_clip + w_t5
            ram += w_clip + w_t5
            move = 2 * (w_clip + w_t5) / ctx.pageable
            te_seconds = ctx.te_passes * ctx.te_compute() + move
            info["te_move_seconds"] = move
            n_steps += 1
        elif fam.te in ("stream", "stream_parked"):
            assert ctx.t5 is not None
            g = ctx.geo(ctx.t5, "loaded", 0)
            pin = _greedy_pinned(g.blocks, max(0, pin_left))
            pin_left -= pin
            ram += g.streamed + g.retained
            pinned += pin
            back = 0.0
            if fam.te == "stream":
                # BlockStreaming(park_after_forward=True): T5's ring is on the GPU while it encodes
                # only; its small rest (embedding, final norm) stays, and so does CLIP.
                persist += w_clip + g.rest
                te_extra += g.device - g.rest
            else:
                # park_rest=True as well, and CLIP streamed with every layer resident and parked the
                # same way: both live in pinned host copies between prompts and are copied back
                # (not overlapped) when a prompt is encoded.
                # CLIP runs (and parks) before T5 starts: the stage holds one of them at a time.
                te_extra += max(g.device, info["clip_geo"].device)
                ram += parked
                pinned += parked
                back = parked / ctx.bw
                n_steps += 1  # the CLIP step
                info["te_parked"] = parked
                info["te_back_seconds"] = back
            t5_c = text_encode_seconds(cal, ctx.t5.sizes, None, ctx.text_tokens)
            clip_c = text_encode_seconds(cal, None, ctx.clip.sizes, ctx.text_tokens) if ctx.clip is not None else 0.0
            one = (
                ctx.smooth(t5_c, pin / ctx.bw)
                + (g.streamed - pin) / ctx.pageable
                + cal.stream_overhead_s
                + clip_c
                + back
            )
            te_seconds = ctx.te_passes * one
            info["t5_geo"] = g
            info["t5_pinned"] = pin
            info["t5_one"] = one
            n_steps += 1
        elif fam.te == "stream_disk":
            assert ctx.t5 is not None
            g = ctx.geo(ctx.t5, "loaded", 0)
            ws = _disk_working_set(g)
            persist += w_clip + g.rest
            te_extra += g.device - g.rest
            ram += ws
            disk_need += g.streamed
            t5_c = text_encode_seconds(cal, ctx.t5.sizes, None, ctx.text_tokens)
            clip_c = text_encode_seconds(cal, None, ctx.clip.sizes, ctx.text_tokens) if ctx.clip is not None else 0.0
            # Page faults and pageable copies block the host: the reads do not overlap the compute.
            one = t5_c + g.streamed / ctx.disk_bw + cal.stream_overhead_s + clip_c
            te_seconds = ctx.te_passes * one
            info["t5_geo"] = g
            info["t5_pinned"] = 0
            info["t5_ws"] = ws
            info["t5_one"] = one
            n_steps += 1
        persist += w_other
        where, why_ram = _place_originals(ctx, ram, retained, disk_need)
        if where == "ram":
            ram += retained
        else:
            disk_need += retained
        info.update(originals=where, retained=retained, originals_ram=ram if where == "ram" else ram + retained)
        info["originals_why_ram"] = why_ram
    info["disk_need"] = disk_need
    info["factor"] = factor
    info["decode_s"] = decode_s
    info["stream_bytes"] = stream_bytes
    info["pageable_copy"] = pageable_copy
    info["disk_copy"] = disk_copy

    # --- stages ---------------------------------------------------------------------------------
    te_raw = persist + te_extra + ctx.t5_act()
    te_pad = ctx.pad(te_raw)

    def step_time(chunk: int | None) -> tuple[float, float]:
        c = ctx.compute(ctx.t.sizes, tokens, chunk)
        if ctx.cn is not None:
            c += ctx.spec.controls * ctx.compute(ctx.cn.sizes, cn_tokens, chunk)
        if fam.place == "sequential":
            # Weights arrive as loaded (fp32 stays fp32) and every layer waits for its own copy.
            c = c * compute_factor(cal, "loaded", loaded_dtype=ctx.t.sizes.dtype) + cal.step_overhead_s
            return c + stream_bytes / cal.sequential_bandwidth, c
        c = c * info["factor"] + info["decode_s"]
        copy = (stream_bytes - pageable_copy - disk_copy) / ctx.bw
        t = (
            ctx.smooth(c, copy)
            + pageable_copy / ctx.pageable
            + disk_copy / ctx.disk_bw
            + (cal.stream_overhead_s if stream_bytes else 0.0)
        )
        return t, c

    den_opts = []
    for chunk in chunks:
        raw = persist + den_extra + ctx.activations(chunk)
        t, c = step_time(chunk)
        den_opts.append((ctx.pad(raw), ctx.passes * t, chunk, c))
    dec_opts = []
    enc_extra = dec_extra  # the VAE encode runs before any step: no ControlNet residual exists yet
    if ctx.cn is not None:
        # diffusers' ControlNet pipelines keep the last step's residuals in a local variable through
        # the VAE decode (H200 grid, two-mode union ControlNet: +0.3 GiB at 1024^2, +1.2 GiB at 2048^2).
        dec_extra += controlnet_residual_bytes(ctx.cn.sizes, ctx.B, ctx.img_tokens, ctx.text_tokens)
    # Parking (BlockStreaming(park_during_decode=True)): the streamed components free their resident
    # blocks, ring and scratch before the VAE decodes; the resident blocks keep a pinned host copy
    # (RAM) and are copied back at the next call's first step (not overlapped: added to the call).
    parkable = park_resident = 0
    if fam.place == "stream" and fam.host == "ram":
        for key in ("t_geo", "c_geo"):
            g = info.get(key)
            if g is not None:
                parkable += g.device - g.rest
                park_resident += g.resident_bytes
    park_ok = (
        parkable > 0
        # Only where no lossy decode (tiling) may be used instead, until parking has been measured on
        # a GPU: the default (auto) plans stay those the H200 grid validated.
        and ctx.quality == "lossless"
        and ram + park_resident <= budget.ram
        and pinned + park_resident <= budget.pinned
    )
    # A parked streamer also starts parked (BlockStreaming parks it once applied) and stays parked
    # from one call's decode to the next call's first step: the text encoding runs beside its rest only.
    te_pad_parked = ctx.pad(te_raw - parkable) if park_ok else te_pad
    for opt in vae_opts:
        dec_pad = ctx.pad(persist + dec_extra + opt.dec_bytes)
        enc_pad = ctx.pad(persist + enc_extra + opt.enc_bytes) if ctx.needs_encode() else 0
        dec_opts.append((dec_pad, enc_pad, opt, False, opt.seconds, te_pad))
        if park_ok:
            # The stage starts with everything still placed, then frees it and decodes.
            parked_pad = ctx.pad(max(persist + dec_extra, persist - parkable + dec_extra + opt.dec_bytes))
            dec_opts.append((parked_pad, enc_pad, opt, True, opt.seconds + park_resident / ctx.bw, te_pad_parked))
    dec_opts.sort(key=lambda d: (d[4], d[2].n_steps, d[3]))
    min_den = min(d[0] for d in den_opts)
    min_dec = min(max(d[0], d[1], d[5]) for d in dec_opts)
    cand.min_peak_vram = max(min_den, min_dec)
    cand.ram = int(ram)
    cand.pinned = int(pinned)
    cand.n_steps = n_steps
    cand.info = info
    cand.lossless = fam.fmt == "loaded"

    vram = budget.vram
    den_pick = next((d for d in den_opts if d[0] <= vram), None)
    dec_pick = next((d for d in dec_opts if d[0] <= vram and d[1] <= vram and d[5] <= vram), None)
    # Choose the fastest options that fit (or the smallest, to report how far off it is).
    if den_pick is None:
        den_pick = min(den_opts, key=lambda d: d[0])
    if dec_pick is None:
        dec_pick = min(dec_opts, key=lambda d: max(d[0], d[1], d[5]))
    den_pad, step_seconds, chunk, compute_s = den_pick
    dec_pad, enc_pad, vae_opt, park, _, te_pad = dec_pick
    info["park"] = park
    if park:
        info["park_resident"] = park_resident
        info["park_seconds"] = park_resident / ctx.bw
        cand.ram = int(ram + park_resident)
        cand.pinned = int(pinned + park_resident)
    cand.chunk = chunk
    cand.vae = vae_opt
    cand.n_steps += vae_opt.n_steps + int(chunk is not None)
    if vae_opt.tile is not None:
        cand.lossless = False
    info["compute_s"] = compute_s
    stages = {
        "text_encoding": StagePrediction(vram=ctx.unpad(te_pad), ram=cand.ram, seconds=te_seconds),
        "denoising_step": StagePrediction(vram=ctx.unpad(den_pad), ram=cand.ram, seconds=step_seconds),
        "vae_decode": StagePrediction(
            vram=ctx.unpad(dec_pad),
            ram=cand.ram,
            seconds=vae_decode_seconds(cal, req.height, req.width, req.batch_size, tile=vae_opt.tile)
            + info.get("park_seconds", 0.0),
        ),
    }
    enc_seconds = vae_opt.seconds - stages["vae_decode"].seconds + info.get("park_seconds", 0.0)
    if ctx.needs_encode():
        stages["vae_encode"] = StagePrediction(vram=ctx.unpad(enc_pad), ram=cand.ram, seconds=max(0.0, enc_seconds))
    if load_seconds > 0:
        stages["load"] = StagePrediction(vram=ctx.unpad(den_pad), ram=cand.ram, seconds=load_seconds)
    if fam.place == "sequential":
        stages["vae_decode"] = StagePrediction(
            vram=ctx.unpad(dec_pad),
            ram=cand.ram,
            seconds=stages["vae_decode"].seconds + w_vae / cal.sequential_bandwidth,
        )
    cand.stages = stages
    # Fitting uses the padded peaks (allocator reserve included); the stages report allocated memory.
    cand.peak_vram = max([te_pad, den_pad, dec_pad] + ([enc_pad] if ctx.needs_encode() else []))
    cand.step_seconds = step_seconds
    cand.call_seconds = (
        te_seconds
        + req.num_inference_steps * step_seconds
        + sum(s.seconds for k, s in stages.items() if k in ("vae_decode", "vae_encode", "load"))
    )
    # --- fits? ------------------------------------------------------------------------------------
    problems = []
    if cand.peak_vram > vram:
        worst = max(stages.items(), key=lambda kv: kv[1].vram)
        problems.append(
            f"does not fit: needs {format_bytes(cand.peak_vram)} VRAM at {worst[0]} "
            f"({format_bytes(cand.peak_vram - vram)} over the {format_bytes(vram)} budget)"
        )
    if cand.ram > budget.ram:
        problems.append(
            f"needs {format_bytes(cand.ram)} host RAM ({format_bytes(cand.ram - budget.ram)} over the "
            f"{format_bytes(budget.ram)} budget)"
            + (f": {info['originals_why_ram']}" if info.get("originals_why_ram") else "")
        )
    if _disk_over(cand, budget):
        problems.append(
            f"needs {format_bytes(disk_need)} in the offload folder ({format_bytes(budget.disk_free)} free on its disk)"
        )
    if info.get("pin_problem"):
        problems.append(info["pin_problem"])
    cand.fits = not problems
    cand.why_not = "; ".join(problems)
    return cand


@dataclass
class SearchResult:
    best: Candidate | None
    by_family: dict[Family, Candidate]
    minimum_vram: int | None
    minimum_ram: int | None
    best_lossless: Candidate | None  # filled by search() when the winner is lossy
    evaluated: int
    ctx: _Ctx


def _run(ctx: _Ctx, families: list[Family] | None = None) -> SearchResult:
    vae_opts = ctx.vae_options()
    chunks = ctx.chunk_options()
    by_family: dict[Family, Candidate] = {}
    best: Candidate | None = None
    minimum_vram: int | None = None
    minimum_ram: int | None = None
    evaluated = 0
    budget = ctx.budget
    for fam in _families(ctx) if families is None else families:
        fam_best: Candidate | None = None
        fam_closest: Candidate | None = None
        # Parts are many (FLUX.1-dev: 247 for 57 blocks): every _PART_STRIDE-th count first, then
        # every count of each interval whose ends differ in what limits them (fits, over VRAM, over
        # RAM, over disk: a narrow window that fits can lie between two counts that do not), and
        # every count next to the best (or, when none fits, the closest).
        stride = _PART_STRIDE if fam.unit == "part" else 1
        sampled: dict[int, Candidate] = {}
        todo = _resident_counts(ctx, fam, stride)
        while todo:
            for r_t, r_c in todo:
                total = r_t + r_c
                if total in sampled:
                    continue
                cand = _evaluate(ctx, fam, r_t, r_c, vae_opts, chunks)
                sampled[total] = cand
                evaluated += 1
                # A plan that needs more disk than the offload folder has is no answer at any VRAM or RAM.
                disk_ok = _disk_over(cand, budget) == 0
                if disk_ok and cand.ram <= budget.ram and (minimum_vram is None or cand.min_peak_vram < minimum_vram):
                    minimum_vram = cand.min_peak_vram
                if disk_ok and cand.min_peak_vram <= budget.vram and (minimum_ram is None or cand.ram < minimum_ram):
                    minimum_ram = cand.ram
                if cand.fits:
                    if fam_best is None or cand.key() < fam_best.key():
                        fam_best = cand
                elif fam_closest is None or _overage(cand, budget) < _overage(fam_closest, budget):
                    fam_closest = cand
            todo = []
            if stride > 1:
                todo = _refinements(ctx, fam, stride, sampled, fam_best or fam_closest, budget)
                stride = 1
        chosen = fam_best or fam_closest
        if chosen is not None:
            by_family[fam] = chosen
        if fam_best is not None:
            if best is None or fam_best.key() < best.key():
                best = fam_best
    return SearchResult(best, by_family, minimum_vram, minimum_ram, None, evaluated, ctx)


def _limits(c: Candidate, budget: Budget) -> tuple[bool, bool, bool, bool]:
    """What bounds a candidate: whether it fits, and whether it is over the VRAM, RAM or disk."""
    return (c.fits, c.peak_vram > budget.vram, c.ram > budget.ram, _disk_over(c, budget) > 0)


def _refinements(
    ctx: _Ctx,
    fam: Family,
    stride: int,
    sampled: dict[int, Candidate],
    anchor: Candidate | None,
    budget: Budget,
) -> list[tuple[int, int]]:
    """The resident counts to evaluate after a strided pass over ``sampled`` (total -> candidate):
    those strictly inside each interval whose ends are bounded differently, and those within
    ``stride`` of ``anchor`` (the best that fits, else the closest)."""
    by_total = {r_t + r_c: (r_t, r_c) for r_t, r_c in _resident_counts(ctx, fam)}
    wanted: set[int] = set()
    totals = sorted(sampled)
    for lo, hi in zip(totals, totals[1:]):
        if _limits(sampled[lo], budget) != _limits(sampled[hi], budget):
            wanted.update(range(lo + 1, hi))
    if anchor is not None:
        centre = anchor.r_t + anchor.r_c
        wanted.update(range(centre - stride + 1, centre + stride))
    return [by_total[t] for t in sorted(wanted) if t in by_total and t not in sampled]


def _overage(c: Candidate, budget: Budget) -> float:
    return max(0, c.peak_vram - budget.vram) + max(0, c.ram - budget.ram) + _disk_over(c, budget)


def _disk_over(c: Candidate, budget: Budget) -> int:
    """Bytes the candidate writes to the offload folder beyond its free space (0 when unknown)."""
    if budget.disk_free is None:
        return 0
    return max(0, int(c.info.get("disk_need", 0)) - budget.disk_free)


# ------------------------------------------------------------------------------------------------
# Turning the winner into a Plan
# ------------------------------------------------------------------------------------------------


def _block_streaming() -> type | None:
    try:
        from ..strategies.streaming import BlockStreaming
    except ImportError:
        return None
    return BlockStreaming


def _lossless(strategy: Any) -> bool:
    if strategy.name == "BlockStreaming":
        # The planner streams a 16-bit model with storage=None (bit-exact) and narrows only on purpose.
        return getattr(strategy, "storage", None) is None
    return bool(strategy.lossless)


def _reversible(strategy: Any) -> bool:
    if strategy.name == "PromptCache":
        return strategy.release == "cpu"
    return bool(getattr(strategy, "reversible", True))


def _binding(ctx: _Ctx, cand: Candidate) -> str:
    """Which stage sets the peak, in words, for the reasons."""
    name, st = max(cand.stages.items(), key=lambda kv: kv[1].vram)
    label = name.replace("_", " ")
    return f"the {label} peaks at {format_bytes(st.vram)} of the {format_bytes(ctx.budget.vram)} budget"


def _steps(res: SearchResult, cand: Candidate) -> list[PlanStep]:
    from ..strategies.configs import (
        AttentionSlicing,
        ModelOffload,
        Precision,
        PromptCache,
        Quantize,
        Resident,
        SequentialOffload,
        StoreFP8,
        VaeSlicing,
        VaeTiling,
    )

    ctx = res.ctx
    cal, req, budget = ctx.cal, ctx.req, ctx.budget
    fam = cand.family
    info = cand.info
    steps: list[tuple[Any, str | None, str]] = []
    tr_names = ("transformer",) + (("controlnet",) if ctx.cn is not None else ())
    tr_label = "/".join(tr_names)
    lossless_alt = _lossless_comparison(res, cand)
    bw = f"{ctx.bw / 1e9:.1f} GB/s"
    w_loaded = ctx.w(ctx.t) + ctx.w(ctx.cn)
    budget_s = format_bytes(budget.vram)
    binding = _binding(ctx, cand)

    if fam.place == "sequential":
        steps.append(
            (
                SequentialOffload(),
                None,
                f"nothing that keeps whole blocks or models on the GPU fits {budget_s} with "
                f"{format_bytes(budget.ram)} of RAM: every layer moves from host RAM just before it runs "
                f"({_gb(info['seq_bytes'])} per step at ~{cal.sequential_bandwidth / 1e9:.1f} GB/s, "
                f"{cand.step_seconds:.2f} s/step); {binding}.",
            )
        )
    else:
        if fam.fmt == "bf16":
            steps.append(
                (
                    # Every component: the pipeline feeds the text encoders' dtype to the transformer,
                    # so a bf16 transformer beside fp32 encoders fails with a dtype mismatch.
                    Precision("bf16", components=tuple(ctx.spec.components)),
                    None,
                    f"{tr_label} are loaded in fp32 ({_gb(w_loaded)}); bf16 halves that to "
                    f"{_gb(ctx.w(ctx.t, 'bf16') + ctx.w(ctx.cn, 'bf16'))} and computes at bf16 speed; the other "
                    f"components follow (one dtype through the pipeline) (changes numerics). {lossless_alt}",
                )
            )
        if fam.place in ("resident", "offload") and fam.fmt == "fp8":
            wt = ctx.w(ctx.t, "fp8") + ctx.w(ctx.cn, "fp8")
            steps.append(
                (
                    StoreFP8(components=tr_names),
                    None,
                    f"fp8 storage cuts {tr_label} from {_gb(w_loaded)} to {_gb(wt)} (norms and embeddings kept), "
                    f"so it stays whole on the GPU; compute +{(cal.fp8_compute_factor - 1) * 100:.0f}% "
                    f"({cand.step_seconds:.3f} s/step). {lossless_alt}",
                )
            )
        if fam.place in ("resident", "offload") and fam.fmt == "int8":
            wt = ctx.w(ctx.t, "int8") + ctx.w(ctx.cn, "int8")
            steps.append(
                (
                    Quantize("int8", backend="torchao", components=tr_names),
                    None,
                    f"int8 weights cut {tr_label} from {_gb(w_loaded)} to {_gb(wt)}, so it stays whole on the GPU; "
                    f"compute +{(cal.int8_compute_factor - 1) * 100:.0f}% ({cand.step_seconds:.3f} s/step). "
                    f"{lossless_alt}",
                )
            )
        if fam.place == "stream":
            BlockStreaming = _block_streaming()
            assert BlockStreaming is not None
            storage = _STORAGE_OF[fam.fmt]
            copy_s = (info["stream_bytes"] - info["pageable_copy"] - info["disk_copy"]) / ctx.bw
            compute_s = info["compute_s"]  # includes the fp8/int8 decode of every encoded block
            parts = [("transformer", cand.r_t, "t")] + ([("controlnet", cand.r_c, "c")] if ctx.cn is not None else [])
            for name, r, key in parts:
                g: _Geo = info[f"{key}_geo"]
                if g.n_streamed == 0 and not g.decoded:
                    continue
                pin = info[f"{key}_pinned"]
                n = g.n_streamed + g.n_resident
                on_disk = fam.host == "disk"
                limit = pin if (pin < g.streamed and not on_disk) else None
                what = "blocks"
                if fam.unit == "part":
                    what = f"parts (of {ctx.n_blocks(name, fam.fmt)} blocks)"
                all_resident = g.n_streamed == 0
                if all_resident:
                    # Nothing streams: the engine only keeps the encoded weights and decodes them per unit.
                    text = (
                        f"{name} is {_gb(ctx.w(ctx.spec.get(name)))} as loaded; all {n} {what} "
                        f"({_gb(g.resident_bytes)}) stay on the GPU"
                    )
                    if fam.unit == "part":
                        block_scratch = ctx.geo(ctx.spec.get(name), fam.fmt, ctx.n_blocks(name, fam.fmt)).scratch  # type: ignore[arg-type]
                        text += (
                            f" (by parts: each is decoded into a scratch of {_gb(g.scratch)} instead of the "
                            f"{_gb(block_scratch)} a whole block needs)"
                        )
                else:
                    text = (
                        f"{name} is {_gb(ctx.w(ctx.spec.get(name)))} as loaded; {r} of {n} {what} "
                        f"({_gb(g.resident_bytes)}) stay on the GPU and {g.n_streamed} stream from "
                        f"{'disk' if on_disk else 'host RAM'} through {g.slots} slots of {_gb(g.slot_bytes)}"
                    )
                    if fam.unit == "part":
                        block_slot = ctx.geo(ctx.spec.get(name), fam.fmt, 0).slot_bytes  # type: ignore[arg-type]
                        text += (
                            f" (streamed by parts: a slot holds the largest part, not the largest block's "
                            f"{_gb(block_slot)}, and the memory saved keeps more of the model resident)"
                        )
                if all_resident:
                    text += f", stored {storage} with per-row scales (changes numerics)" if storage else ""
                elif storage in ("fp8", "int8"):
                    text += (
                        f", stored {storage} with per-row scales ({_gb(g.streamed)} to copy per step instead of "
                        f"{_gb(_raw_streamed(ctx, name, r, fam.unit))}; changes numerics)"
                    )
                elif storage is not None:
                    text += f", stored {storage} (changes numerics)"
                if limit is not None:
                    text += (
                        f"; {_gb(pin)} pinned and {_gb(g.streamed - pin)} pageable (pinnable RAM is "
                        f"{format_bytes(budget.pinned)})"
                    )
                if on_disk:
                    ws = info[f"{key}_ws"]
                    in_ram = cand.ram - ws + g.streamed + g.retained
                    disk_s = g.streamed / ctx.disk_bw
                    text += (
                        f". The streamed blocks ({_gb(g.streamed)}) live in a memory-mapped file in the offload "
                        f"folder, because keeping them in host RAM would take this plan's RAM to "
                        f"{format_bytes(in_ram)}, over the {format_bytes(budget.ram)} RAM budget: host RAM holds "
                        f"only the page cache of the blocks in flight (~{_gb(ws)}, reclaimable). Per step: read "
                        f"and copy {_gb(g.streamed)} at the disk rate {ctx.disk_bw / 1e9:.1f} GB/s ({ctx.disk_source})"
                        f" = {disk_s:.3f} s, not overlapped with the {compute_s:.3f} s of compute"
                        f" -> {cand.step_seconds / ctx.passes:.3f} s; {binding}, so more resident {fam.unit}s"
                        " do not fit."
                    )
                elif all_resident:
                    text += (
                        f". Per step: {compute_s:.3f} s of compute"
                        + (f" (incl. {info['decode_s']:.3f} s decoding {storage})" if info["decode_s"] else "")
                        + f"; {binding}."
                    )
                else:
                    text += (
                        f". Per step: copy {_gb(info['stream_bytes'])} at {bw} = {copy_s:.3f} s overlapped with "
                        f"{compute_s:.3f} s of compute"
                        + (f" (incl. {info['decode_s']:.3f} s decoding {storage})" if info["decode_s"] else "")
                        + f" -> {cand.step_seconds / ctx.passes:.3f} s; {binding}, so more resident {fam.unit}s"
                        + " do not fit."
                    )
                # Where the originals of re-encoded weights wait for restore (nothing said from disk,
                # where the offload file holds them anyway).
                originals = _originals_reason(ctx, cand, name, g, storage) if storage is not None else ""
                if originals:
                    text = text.rstrip(".") + originals + "."
                if lossless_alt:
                    text += " " + lossless_alt
                if info.get("park"):
                    text = text.rstrip(".")
                    text += (
                        f"; while the VAE decodes, the resident blocks, ring and scratch are freed (parked) and "
                        f"come back at the next call's first step ({_gb(info['park_resident'])} from a pinned "
                        f"host copy, {info['park_seconds']:.2f} s per call), so the decode's activations need not "
                        "fit beside them"
                    )
                steps.append(
                    (
                        BlockStreaming(
                            resident=r,
                            prefetch=_PREFETCH,
                            storage=storage,
                            components=(name,),
                            pinned_limit=limit,
                            host=fam.host,
                            park_during_decode=bool(info.get("park")),
                            unit=fam.unit,
                            originals=info.get("originals", "ram"),
                        ),
                        name,
                        text,
                    )
                )
        if fam.place == "offload":
            comps = tr_names + (("vae",) if ctx.vae is not None else ())
            moved = ctx.w(ctx.t, fam.fmt) + ctx.w(ctx.cn, fam.fmt) + ctx.w(ctx.vae)
            steps.append(
                (
                    ModelOffload(components=comps),
                    None,
                    f"{', '.join(comps)} ({_gb(moved)}) live in host RAM and move to the GPU whole when used "
                    f"({cand.stages['load'].seconds:.1f} s per call at ~{ctx.pageable / 1e9:.0f} GB/s), so the text "
                    f"encoders and the VAE decode get the GPU to themselves; {binding}.",
                )
            )
        if fam.te == "cache":
            w_te = ctx.w(ctx.clip) + ctx.w(ctx.t5)
            steps.append(
                (
                    PromptCache(release="cpu"),
                    None,
                    f"the text encoders ({_gb(w_te)}) are on the GPU only while a new prompt is encoded "
                    f"({info['te_move_seconds']:.1f} s to move them in and out at ~{ctx.pageable / 1e9:.0f} GB/s; "
                    f"a repeated prompt costs nothing), leaving that memory to the transformer.",
                )
            )
        if fam.te in ("stream", "stream_parked"):
            BlockStreaming = _block_streaming()
            assert BlockStreaming is not None and ctx.t5 is not None
            g = info["t5_geo"]
            pin = info["t5_pinned"]
            w_t5 = ctx.w(ctx.t5)
            move = 2 * (ctx.w(ctx.clip) + w_t5) / ctx.pageable
            where = "pinned RAM" if pin >= g.streamed else f"host RAM ({_gb(pin)} pinned, the rest pageable)"
            parked = fam.te == "stream_parked"
            after = (
                "nothing after: its ring is freed and its embedding parked in pinned RAM until the next prompt"
                if parked
                else f"{_gb(g.rest)} after: its ring is freed until the next prompt"
            )
            steps.append(
                (
                    BlockStreaming(
                        resident=0,
                        prefetch=_PREFETCH,
                        components=("text_encoder_2",),
                        pinned_limit=pin if pin < g.streamed else None,
                        park_after_forward=True,
                        park_rest=parked,
                    ),
                    "text_encoder_2",
                    f"T5 ({_gb(w_t5)}) runs once per prompt: streaming its {g.n_streamed} blocks from {where} "
                    f"takes {info['t5_one']:.2f} s per prompt and needs only {_gb(g.device)} on the GPU while it "
                    f"encodes ({after}), instead of "
                    f"{_gb(w_t5)} resident through every step or {move:.1f} s to move it in and out whole.",
                )
            )
            if parked:
                gc = info["clip_geo"]
                steps.append(
                    (
                        BlockStreaming(
                            resident=gc.n_resident,
                            prefetch=_PREFETCH,
                            components=("text_encoder",),
                            park_after_forward=True,
                            park_rest=True,
                        ),
                        "text_encoder",
                        f"CLIP ({_gb(ctx.w(ctx.clip))}) and T5's embedding ({_gb(g.rest)}) leave the GPU between "
                        f"prompts: pinned host copies ({_gb(info['te_parked'])}) are copied back when a prompt is "
                        f"encoded ({info['te_back_seconds']:.3f} s, lossless), so the denoising steps and the VAE "
                        f"decode have that memory; {binding}.",
                    )
                )
    if fam.te == "stream_disk":
        BlockStreaming = _block_streaming()
        assert BlockStreaming is not None and ctx.t5 is not None
        g = info["t5_geo"]
        w_t5 = ctx.w(ctx.t5)
        steps.append(
            (
                BlockStreaming(
                    resident=0,
                    prefetch=_PREFETCH,
                    components=("text_encoder_2",),
                    host="disk",
                    park_after_forward=True,
                ),
                "text_encoder_2",
                f"T5 ({_gb(w_t5)}) does not fit the {format_bytes(budget.vram)} GPU budget beside the rest, and "
                f"keeping it in host RAM would take this plan's RAM to "
                f"{format_bytes(cand.ram - info['t5_ws'] + g.streamed)}, over the {format_bytes(budget.ram)} "
                f"RAM budget: its {g.n_streamed} blocks stream from a memory-mapped file in the offload folder "
                f"(~{_gb(info['t5_ws'])} of reclaimable page cache in RAM) at the disk rate "
                f"{ctx.disk_bw / 1e9:.1f} GB/s ({ctx.disk_source}): {info['t5_one']:.2f} s per prompt, "
                f"{_gb(g.device)} on the GPU.",
            )
        )
    if cand.chunk is not None:
        full = transformer_activation_bytes(cal, ctx.t.sizes, ctx.B, ctx.tokens, materialized_scores=True)
        part = transformer_activation_bytes(
            cal, ctx.t.sizes, ctx.B, ctx.tokens, materialized_scores=True, chunk=cand.chunk
        )
        steps.append(
            (
                AttentionSlicing(chunk=cand.chunk, components=tr_names),
                None,
                f"attention on {budget.device} materializes the {ctx.tokens}x{ctx.tokens} scores: {cand.chunk}-query "
                f"chunks cut the step's activation peak from {_gb(full)} to {_gb(part)}; {binding}.",
            )
        )
    vae_sizes = ctx.vae.sizes if ctx.vae is not None else None
    if cand.vae is not None and cand.vae.tile is not None:
        plain = vae_decode_bytes(cal, vae_sizes, req.height, req.width, req.batch_size, slicing=cand.vae.slicing)
        tiled = vae_decode_bytes(
            cal, vae_sizes, req.height, req.width, req.batch_size, tile=cand.vae.tile, slicing=cand.vae.slicing
        )
        extra = vae_decode_seconds(cal, req.height, req.width, req.batch_size, tile=cand.vae.tile) - vae_decode_seconds(
            cal, req.height, req.width, req.batch_size
        )
        n_tiles = vae_tiles(req.height, req.width, cand.vae.tile)
        steps.append(
            (
                VaeTiling(tile=cand.vae.tile),
                "vae",
                f"a plain decode of {req.width}x{req.height} needs {_gb(plain)} on top of the weights on the GPU; "
                f"{n_tiles} tiles of {cand.vae.tile}px need {_gb(tiled)} (+{extra:.2f} s per call), and the memory "
                f"saved goes to the transformer (pixels near tile seams may differ slightly); {binding}.",
            )
        )
    if cand.vae is not None and cand.vae.slicing:
        whole = vae_decode_bytes(cal, vae_sizes, req.height, req.width, req.batch_size, tile=cand.vae.tile)
        one = vae_decode_bytes(cal, vae_sizes, req.height, req.width, req.batch_size, tile=cand.vae.tile, slicing=True)
        steps.append(
            (
                VaeSlicing(),
                "vae",
                f"decoding {req.batch_size} images at once needs {_gb(whole)}; one at a time needs {_gb(one)} "
                f"at about the same speed; {binding}.",
            )
        )
    # Every component no step places (none when sequential offload takes them all) stays whole on
    # the GPU: say so with a Resident step, which moves it there when the plan is applied.
    placed: set[str] = set()
    for s, _component, _ in steps:
        if isinstance(s, SequentialOffload):
            placed |= set(ctx.spec.components)
        elif isinstance(s, PromptCache):
            placed |= {"text_encoder", "text_encoder_2"}
        elif isinstance(s, ModelOffload):
            placed |= set(s.components or ())
        elif s.name == "BlockStreaming":
            placed |= set(s.components or ())
    resident = tuple(c for c in ctx.spec.components if c not in placed)
    if resident:
        sizes = ", ".join(
            f"{c} {_gb(ctx.w(ctx.spec.get(c), fam.fmt if c in tr_names else 'loaded'))}" for c in resident
        )
        steps.append(
            (
                Resident(components=resident),
                None,
                f"{sizes}: whole on the GPU for the entire call, no transfers; {binding}.",
            )
        )
    out = [
        PlanStep(strategy=s, component=comp, reason=reason, lossless=_lossless(s), reversible=_reversible(s))
        for s, comp, reason in steps
    ]
    out.sort(key=lambda st: st.strategy.order)
    return out


def _raw_streamed(ctx: _Ctx, name: str, r: int, unit: str = "block") -> int:
    comp = ctx.spec.get(name)
    assert comp is not None
    if not ctx.can_stream(comp, "loaded") or comp.stream is None or unit not in comp.stream.units(None):
        return 0
    return ctx.geo(comp, "loaded", r, unit).streamed


def _lossless_comparison(res: SearchResult, cand: Candidate) -> str:
    if cand.lossless:
        return ""
    alt = res.best_lossless
    if alt is None:
        return "No lossless plan fits this budget."
    if alt is cand:
        return ""
    return (
        f"The fastest lossless plan takes {alt.call_seconds:.1f} s per call ({alt.step_seconds:.3f} s/step) vs "
        f"{cand.call_seconds:.1f} s."
    )


def _rejected(res: SearchResult, best: Candidate) -> list[Rejected]:
    ctx = res.ctx
    out: list[tuple[tuple[int, float], Rejected]] = []
    for cand in res.by_family.values():
        if cand is best:
            continue
        desc = cand.describe(ctx)
        if cand.fits:
            slower = cand.call_seconds - best.call_seconds
            if slower <= 0:
                if not cand.lossless and best.lossless:
                    reason = "as fast, but changes numerics"
                elif cand.n_steps > best.n_steps:
                    reason = "as fast, with more steps"
                else:
                    reason = "as fast; the chosen plan came first (or peaks lower)"
            else:
                reason = (
                    f"slower by {slower:.2f} s per call ({cand.step_seconds:.3f} vs {best.step_seconds:.3f} s/step)"
                )
            if ctx.quality == "lossless" and not cand.lossless:
                reason = "changes numerics (quality='lossless')"
            out.append(((0, cand.call_seconds), Rejected(desc, reason, cand.peak_vram, cand.step_seconds)))
        else:
            out.append(
                ((1, _overage(cand, ctx.budget)), Rejected(desc, cand.why_not, cand.peak_vram, cand.step_seconds))
            )
    out.sort(key=lambda kv: kv[0])
    return [r for _, r in out]


def search(
    spec: PipelineSpec,
    req: Request,
    budget: Budget,
    quality: str = "auto",
    calibration: Calibration | None = None,
    *,
    request_record: dict[str, Any] | None = None,
    notes: list[str] | None = None,
    parts: bool = True,
) -> Plan:
    """Plan ``req`` for ``spec`` within ``budget`` (see the module docstring). Raises
    :class:`~vramkit.errors.PlanInfeasibleError` with the smallest budget that plans. ``parts=False``
    keeps streamed components to whole blocks (for a plan that will be compiled)."""
    if quality not in QUALITIES:
        raise InvalidRequestError(f"quality={quality!r}: use one of {QUALITIES}.")
    cal = calibration if calibration is not None else Calibration.load()
    streaming = _block_streaming() is not None
    if budget.devices:
        from .devices import search_devices

        return search_devices(
            spec, req, budget, quality, cal, streaming, dict(request_record or {}), list(notes or []), parts
        )
    ctx = _Ctx(spec, req, budget, quality, cal, streaming, parts)
    res = _run(ctx)
    best = res.best
    record = dict(request_record or {})
    if best is None:
        raise _infeasible(res, record)
    if not best.lossless:
        # The fastest strictly lossless plan (plain VAE decode too), for the reasons of lossy steps.
        res.best_lossless = _run(_Ctx(spec, req, budget, "lossless", cal, streaming)).best
    steps = _steps(res, best)
    stages = best.stages
    plan_notes = list(notes or [])
    plan_notes.append(_placement_note(ctx, best))
    if not streaming:
        plan_notes.append("block streaming is not available (vramkit.strategies.streaming not importable)")
    plan_notes.append(
        "predicted peaks are allocated memory (torch.cuda.max_memory_allocated); the plan was fitted with "
        f"{cal.allocator_reserve_fraction:.0%} + {format_bytes(cal.allocator_reserve_bytes)} more per stage for the "
        f"allocator ({format_bytes(best.peak_vram)} at the highest stage)"
    )
    plan_notes.append(f"{res.evaluated} candidates evaluated; constants: {cal.source}")
    return Plan(
        steps=steps,
        predicted=Predicted(
            peak_vram=max(st.vram for st in stages.values()),
            peak_ram=best.ram,
            seconds_per_step=best.step_seconds,
            seconds_per_image=best.call_seconds / req.batch_size,
            num_inference_steps=req.num_inference_steps,
            stages=stages,
        ),
        rejected=_rejected(res, best),
        request=record,
        notes=plan_notes,
    )


def _placement_note(ctx: _Ctx, best: Candidate) -> str:
    fam = best.family
    parts = [best.describe(ctx)]
    if fam.te == "resident":
        parts.append(f"text encoders stay on the GPU ({_gb(ctx.w(ctx.clip) + ctx.w(ctx.t5))})")
    if fam.place == "resident":
        parts.append(f"transformer stays on the GPU ({_gb(ctx.w(ctx.t, fam.fmt) + ctx.w(ctx.cn, fam.fmt))})")
    if ctx.vae is not None and fam.place in ("resident", "stream"):
        parts.append(f"VAE stays on the GPU ({_gb(ctx.w(ctx.vae))})")
    return "placement: " + "; ".join(parts)


def _infeasible(res: SearchResult, record: dict[str, Any]) -> PlanInfeasibleError:
    ctx = res.ctx
    b = ctx.budget
    what = f"{ctx.spec.name} at {ctx.req.width}x{ctx.req.height}, batch {ctx.req.batch_size} (quality={ctx.quality!r})"
    parts = [f"no plan for {what} fits {format_bytes(b.vram)} VRAM and {format_bytes(b.ram)} RAM"]
    if b.disk_free is not None:
        parts[0] += f" with {format_bytes(b.disk_free)} free in the offload folder"
    if res.minimum_vram is not None:
        parts.append(f"the smallest plan needs {format_bytes(res.minimum_vram)} of VRAM (vram={res.minimum_vram})")
    elif b.disk_free is not None:
        parts.append(
            "no plan fits this much host RAM and free disk at any VRAM (free space in the offload folder, or point "
            "VRAMKIT_OFFLOAD_DIR at a larger local disk)"
        )
    else:
        parts.append("no plan fits this much host RAM at any VRAM")
    if res.minimum_ram is not None and res.minimum_ram > b.ram:
        parts.append(f"at this VRAM the smallest plan needs {format_bytes(res.minimum_ram)} of RAM")
    if ctx.quality == "lossless":
        parts.append("quality='auto' also allows fp8/int8 weights and VAE tiling, which need less")
    return PlanInfeasibleError("; ".join(parts) + ".", minimum_vram=res.minimum_vram, minimum_ram=res.minimum_ram)
