"""Measure the constants of vramkit's memory and time model on a GPU and write a calibration JSON.

Run on a CUDA machine (H100/H200, torch 2.11, diffusers 0.42.1) from the repository root:

    PYTHONPATH=src:/tmp/site python3 benchmarks/calibrate.py            # writes $OUT/calibration.json

then copy the file to ``benchmarks/results/calibration.json`` (or point ``VRAMKIT_CALIBRATION`` at it):
:meth:`vramkit.memory.calibration.Calibration.load` reads it, so every plan uses the measured figures.

What it measures, with full-size FLUX models built directly on the GPU with random bf16 weights
(seconds; nothing is downloaded), each configuration in its own ``try`` (an OOM or error is recorded
and the run goes on), peaks as ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
times as the median of a few runs after a warm-up:

1. host-to-device bandwidth: 256 MiB from pinned memory, 1 GiB from pageable memory;
2. T5-XXL encoding at 256 and 512 tokens, CLIP-L at 77 tokens;
3. one FLUX.1-dev transformer step at 512^2, 1024^2, 1360x768, 2048^2 (batch 1), 1024^2 batch 2,
   1024^2 with the math SDPA backend (materialized scores) with and without query chunks of 1024,
   2048^2 with vramkit's query-chunked attention; block streaming (vramkit engine, 28 of 57 blocks
   resident, bf16 and fp8 storage); fp8 layerwise casting (diffusers, as StoreFP8 does);
4. one ControlNet Union step at 1024^2;
5. VAE decode at 512^2, 1024^2, 1360x768, 2048^2, 1024^2 batch 2 (plain and sliced), 1024^2 and
   2048^2 in 512 px tiles; VAE encode at 1024^2.

It prints a short table and writes one JSON object: device name, torch/diffusers/CUDA versions, the
command, every measurement, and ``calibration``: the fields of ``Calibration`` fitted from them
(figures that could not be measured keep their built-in defaults, listed under ``not_measured``).
Budget: about 2-4 minutes on one H100 (``--quick`` skips streaming and the 2048^2 runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GIB = 2**30


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


class Recorder:
    """Runs each configuration in isolation and keeps what it measured (or why it failed)."""

    def __init__(self, reps: int) -> None:
        self.reps = reps
        self.rows: list[dict[str, Any]] = []

    def measure(
        self,
        stage: str,
        config: dict[str, Any],
        fn: Callable[[], Any],
        *,
        reps: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Warm up once, then time ``reps`` calls; record peak allocated above the baseline."""
        row: dict[str, Any] = {"stage": stage, **config}
        reps = self.reps if reps is None else reps
        try:
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                out = fn()
                del out
                torch.cuda.synchronize()
                warm_peak = torch.cuda.max_memory_allocated()
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    out = fn()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    del out
            peak = max(warm_peak, torch.cuda.max_memory_allocated())
            row.update(
                ok=True,
                seconds=statistics.median(times),
                seconds_all=[round(t, 5) for t in times],
                baseline_allocated=baseline,
                peak_allocated=peak,
                activation_bytes=peak - baseline,
                peak_reserved=torch.cuda.max_memory_reserved(),
            )
            if extra:
                row.update(extra)
            log(f"{stage:<16} {_cfg(config):<44} {row['seconds'] * 1e3:9.1f} ms  +{(peak - baseline) / 1e9:6.2f} GB")
        except torch.cuda.OutOfMemoryError as exc:
            row.update(ok=False, error="OOM", detail=str(exc).splitlines()[0][:300])
            log(f"{stage:<16} {_cfg(config):<44} OOM")
        except Exception as exc:  # noqa: BLE001 - one failed configuration must not end the run
            row.update(ok=False, error=type(exc).__name__, detail=str(exc)[:500], trace=traceback.format_exc()[-2000:])
            log(f"{stage:<16} {_cfg(config):<44} FAILED: {type(exc).__name__}: {str(exc)[:160]}")
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        self.rows.append(row)
        return row if row.get("ok") else None

    def note_failure(self, stage: str, config: dict[str, Any], exc: BaseException) -> None:
        error = "OOM" if isinstance(exc, torch.cuda.OutOfMemoryError) else type(exc).__name__
        self.rows.append({"stage": stage, **config, "ok": False, "error": error, "detail": str(exc)[:500]})
        log(f"{stage:<16} {_cfg(config):<44} FAILED: {error}: {str(exc)[:160]}")


def _cfg(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def _free(*objs: Any) -> None:
    del objs
    gc.collect()
    torch.cuda.empty_cache()


def _weights(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def build(name: str) -> torch.nn.Module:
    from vramkit.memory.architectures import build_architecture

    t0 = time.perf_counter()
    model = build_architecture(name, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    log(f"built {name} on the GPU in {time.perf_counter() - t0:.1f} s ({_weights(model) / 1e9:.2f} GB)")
    return model


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


def bandwidth(rec: Recorder) -> dict[str, float]:
    out: dict[str, float] = {}
    for kind, nbytes in (("pinned", 256 * 2**20), ("pageable", GIB)):
        try:
            src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=(kind == "pinned"))
            src.fill_(1)
            dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                dst.copy_(src, non_blocking=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            rate = nbytes / min(times)
            out[kind] = rate
            rec.rows.append(
                {
                    "stage": "h2d_bandwidth",
                    "memory": kind,
                    "bytes": nbytes,
                    "ok": True,
                    "seconds": min(times),
                    "bytes_per_s": rate,
                }
            )
            log(f"h2d {kind:<9} {rate / 1e9:6.1f} GB/s")
            _free(src, dst)
        except Exception as exc:  # noqa: BLE001
            rec.note_failure("h2d_bandwidth", {"memory": kind}, exc)
    return out


def text_encoders(rec: Recorder) -> None:
    try:
        t5 = build("t5-xxl")
    except Exception as exc:  # noqa: BLE001
        rec.note_failure("text_encoding", {"model": "t5-xxl", "phase": "build"}, exc)
        return
    w = _weights(t5)
    for tokens in (256, 512):
        ids = torch.randint(0, 32128, (1, tokens), device="cuda")
        rec.measure(
            "text_encoding",
            {"model": "t5-xxl", "tokens": tokens},
            lambda ids=ids: t5(input_ids=ids)[0],
            extra={"weight_bytes": w},
        )
    # T5 streamed with no resident block (what the planner does for T5 on small cards).
    streamer = None
    try:
        from vramkit.engine import enable_block_streaming

        streamer = enable_block_streaming(t5, resident=0, prefetch=1, device="cuda")
        ids = torch.randint(0, 32128, (1, 512), device="cuda")
        rec.measure(
            "text_encoding",
            {"model": "t5-xxl", "tokens": 512, "streaming": "resident=0"},
            lambda: t5(input_ids=ids)[0],
            extra={"streamed_bytes": streamer.summary().get("streamed_nbytes")},
        )
    except Exception as exc:  # noqa: BLE001
        rec.note_failure("text_encoding", {"model": "t5-xxl", "streaming": "resident=0"}, exc)
    finally:
        if streamer is not None:
            streamer.restore()
    _free(t5)
    try:
        clip = build("clip-l")
        ids = torch.randint(0, 49408, (1, 77), device="cuda")
        rec.measure(
            "text_encoding",
            {"model": "clip-l", "tokens": 77},
            lambda: clip(input_ids=ids)[0],
            extra={"weight_bytes": _weights(clip)},
        )
        _free(clip)
    except Exception as exc:  # noqa: BLE001
        rec.note_failure("text_encoding", {"model": "clip-l", "phase": "build"}, exc)


def _flux_inputs(batch: int, height: int, width: int, text: int = 512, in_channels: int = 64) -> dict[str, Any]:
    n = (height // 16) * (width // 16)
    dev, dt = "cuda", torch.bfloat16
    img_ids = torch.zeros(n, 3, device=dev, dtype=dt)
    img_ids[:, 1] = torch.arange(height // 16, device=dev).repeat_interleave(width // 16).to(dt)
    img_ids[:, 2] = torch.arange(width // 16, device=dev).repeat(height // 16).to(dt)
    return {
        "hidden_states": torch.randn(batch, n, in_channels, device=dev, dtype=dt),
        "encoder_hidden_states": torch.randn(batch, text, 4096, device=dev, dtype=dt),
        "pooled_projections": torch.randn(batch, 768, device=dev, dtype=dt),
        "timestep": torch.full((batch,), 0.5, device=dev, dtype=dt),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text, 3, device=dev, dtype=dt),
        "guidance": torch.full((batch,), 3.5, device=dev, dtype=dt),
        "return_dict": False,
    }


def _step(model: torch.nn.Module, inputs: dict[str, Any]) -> Callable[[], Any]:
    return lambda: model(**inputs)[0]


def _set_chunked_attention(model: torch.nn.Module, chunk: int | None) -> Callable[[], None]:
    """Swap in vramkit's query-chunked Flux attention processor; returns the undo."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from vramkit.strategies.attention import ChunkedFluxAttnProcessor

    originals = [
        (m, m.processor) for m in model.modules() if isinstance(getattr(m, "processor", None), FluxAttnProcessor)
    ]
    if chunk is not None:
        for m, proc in originals:
            m.processor = ChunkedFluxAttnProcessor(chunk, proc)

    def undo() -> None:
        for m, proc in originals:
            m.processor = proc

    return undo


def transformer(rec: Recorder, quick: bool) -> None:
    try:
        model = build("flux-dev")
    except Exception as exc:  # noqa: BLE001
        rec.note_failure("denoising_step", {"phase": "build"}, exc)
        return
    w = _weights(model)
    sizes = [(512, 512), (1024, 1024), (768, 1360)] + ([] if quick else [(2048, 2048)])
    for h, wd in sizes:
        inputs = _flux_inputs(1, h, wd)
        rec.measure(
            "denoising_step",
            {"height": h, "width": wd, "batch": 1, "weights": "bf16"},
            _step(model, inputs),
            extra={"weight_bytes": w, "tokens": (h // 16) * (wd // 16) + 512},
        )
        del inputs
    inputs = _flux_inputs(2, 1024, 1024)
    rec.measure(
        "denoising_step",
        {"height": 1024, "width": 1024, "batch": 2, "weights": "bf16"},
        _step(model, inputs),
        extra={"weight_bytes": w, "tokens": 4608},
    )
    del inputs
    # Materialized attention scores (math SDPA), unchunked and in query chunks of 1024.
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        inputs = _flux_inputs(1, 1024, 1024)
        for chunk in (None, 1024):
            undo = _set_chunked_attention(model, chunk)
            try:

                def run(inputs: dict[str, Any] = inputs) -> Any:
                    with sdpa_kernel(SDPBackend.MATH):
                        return model(**inputs)[0]

                rec.measure(
                    "denoising_step",
                    {"height": 1024, "width": 1024, "batch": 1, "attention": "math", "chunk": chunk},
                    run,
                    reps=2,
                    extra={"weight_bytes": w, "tokens": 4608},
                )
            finally:
                undo()
        del inputs
    except Exception as exc:  # noqa: BLE001
        rec.note_failure("denoising_step", {"attention": "math"}, exc)
    if not quick:
        inputs = _flux_inputs(1, 2048, 2048)
        undo = _set_chunked_attention(model, 1024)
        try:
            rec.measure(
                "denoising_step",
                {"height": 2048, "width": 2048, "batch": 1, "attention": "flash", "chunk": 1024},
                _step(model, inputs),
                extra={"weight_bytes": w, "tokens": 16896},
            )
        finally:
            undo()
        del inputs
    if not quick:
        streaming(rec, model)
    # fp8 layerwise casting last: it rewrites the weights in place.
    try:
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(
            model,
            storage_dtype=torch.float8_e4m3fn,
            compute_dtype=torch.bfloat16,
            skip_modules_pattern="auto",
            non_blocking=True,
        )
        gc.collect()
        torch.cuda.empty_cache()
        inputs = _flux_inputs(1, 1024, 1024)
        rec.measure(
            "denoising_step",
            {"height": 1024, "width": 1024, "batch": 1, "weights": "fp8_layerwise"},
            _step(model, inputs),
            extra={"weight_bytes": _weights(model), "tokens": 4608},
        )
        del inputs
    except Exception as exc:  # noqa: BLE001
        rec.note_failure("denoising_step", {"weights": "fp8_layerwise"}, exc)
    _free(model)


def streaming(rec: Recorder, model: torch.nn.Module) -> None:
    """vramkit's block streaming engine at 1024^2: 10, 28 and 45 of 57 blocks resident in bf16, and
    28 with fp8 storage."""
    try:
        from vramkit.engine import enable_block_streaming
    except ImportError as exc:
        rec.note_failure("denoising_step", {"streaming": "engine"}, exc)
        return
    inputs = _flux_inputs(1, 1024, 1024)
    for resident, storage in ((10, None), (28, None), (45, None), (28, "fp8")):
        streamer = None
        try:
            t0 = time.perf_counter()
            streamer = enable_block_streaming(model, resident=resident, prefetch=1, storage=storage, device="cuda")
            setup = time.perf_counter() - t0
            summary = streamer.summary()
            rec.measure(
                "denoising_step",
                {"height": 1024, "width": 1024, "batch": 1, "streaming": f"resident={resident}", "storage": storage},
                _step(model, inputs),
                extra={
                    "streamed_bytes": summary.get("streamed_nbytes"),
                    "device_bytes": summary.get("device_nbytes"),
                    "pinned_bytes": summary.get("pinned_nbytes_actual"),
                    "setup_seconds": setup,
                    "tokens": 4608,
                    "decoded_bytes": sum(b.original_nbytes for b in streamer.layout.blocks if b.encoded),
                },
            )
        except Exception as exc:  # noqa: BLE001
            rec.note_failure("denoising_step", {"streaming": f"resident={resident}", "storage": storage}, exc)
        finally:
            if streamer is not None:
                streamer.restore()
            gc.collect()
            torch.cuda.empty_cache()
    del inputs


def controlnet(rec: Recorder) -> None:
    try:
        model = build("controlnet-union")
    except Exception as exc:  # noqa: BLE001
        rec.note_failure("controlnet_step", {"phase": "build"}, exc)
        return
    inputs = _flux_inputs(1, 1024, 1024)
    inputs["controlnet_cond"] = torch.randn_like(inputs["hidden_states"])
    inputs["controlnet_mode"] = torch.zeros(1, 1, dtype=torch.long, device="cuda")  # (batch, 1), as the pipeline
    inputs["conditioning_scale"] = 1.0
    rec.measure(
        "controlnet_step",
        {"height": 1024, "width": 1024, "batch": 1},
        lambda: model(**inputs),
        extra={"weight_bytes": _weights(model), "tokens": 4608},
    )
    _free(model, inputs)


def vae(rec: Recorder, quick: bool) -> None:
    try:
        model = build("vae")
    except Exception as exc:  # noqa: BLE001
        rec.note_failure("vae_decode", {"phase": "build"}, exc)
        return
    w = _weights(model)

    def decode(batch: int, h: int, wd: int) -> Callable[[], Any]:
        z = torch.randn(batch, 16, h // 8, wd // 8, device="cuda", dtype=torch.bfloat16)
        return lambda: model.decode(z, return_dict=False)[0]

    def set_mode(tile: int | None, slicing: bool) -> None:
        model.use_slicing = slicing
        model.use_tiling = tile is not None
        if tile is not None:  # exactly what vramkit's VaeTiling does
            model.tile_sample_min_size = tile
            model.tile_latent_min_size = tile // 8
            model.tile_overlap_factor = 0.25

    configs = [
        (1, 512, 512, None, False),
        (1, 1024, 1024, None, False),
        (1, 768, 1360, None, False),
        (2, 1024, 1024, None, False),
        (2, 1024, 1024, None, True),
        (1, 1024, 1024, 512, False),
    ]
    if not quick:
        configs += [(1, 2048, 2048, None, False), (1, 2048, 2048, 512, False)]
    for batch, h, wd, tile, slicing in configs:
        set_mode(tile, slicing)
        rec.measure(
            "vae_decode",
            {"height": h, "width": wd, "batch": batch, "tile": tile, "slicing": slicing},
            decode(batch, h, wd),
            extra={"weight_bytes": w},
        )
    set_mode(None, False)
    x = torch.randn(1, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    rec.measure(
        "vae_encode",
        {"height": 1024, "width": 1024, "batch": 1},
        lambda: model.encode(x, return_dict=False)[0].mode(),
        extra={"weight_bytes": w},
    )
    _free(model, x)


# ------------------------------------------------------------------------------------------------
# Fitting the Calibration fields
# ------------------------------------------------------------------------------------------------


def _ok(rows: list[dict[str, Any]], stage: str, **match: Any) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r.get("stage") != stage or not r.get("ok"):
            continue
        if all(r.get(k) == v for k, v in match.items()):
            out.append(r)
    return out


def _flux_flops(batch: int, tokens: int) -> float:
    params, hidden, layers = 11_901_408_320, 3072, 57  # FLUX.1-dev, as vramkit.memory.estimator counts
    return batch * (2.0 * params * tokens + 4.0 * tokens * tokens * hidden * layers)


def fit(rows: list[dict[str, Any]], bw: dict[str, float], device_name: str) -> tuple[dict[str, Any], list[str]]:
    from vramkit.memory.calibration import Calibration

    cal: dict[str, Any] = {}
    if "pinned" in bw:
        cal["pinned_bandwidth"] = bw["pinned"]
    if "pageable" in bw:
        cal["pageable_bandwidth"] = bw["pageable"]
    # Transformer: t = overhead + flops / rate, least squares over the batch-1 flash steps.
    steps = [r for r in _ok(rows, "denoising_step", weights="bf16") if "attention" not in r and "streaming" not in r]
    pts = [(_flux_flops(r["batch"], r["tokens"]), r["seconds"]) for r in steps]
    if len(pts) >= 2:
        # Least squares on relative errors (weights 1/t^2), so small sizes count as much as 2048^2.
        sw = sum(1 / t**2 for _, t in pts)
        swx = sum(x / t**2 for x, t in pts)
        swy = sum(1 / t for _, t in pts)
        swxx = sum(x * x / t**2 for x, t in pts)
        swxy = sum(x / t for x, t in pts)
        det = sw * swxx - swx * swx
        if det > 0:
            slope = (sw * swxy - swx * swy) / det
            overhead = (swy - slope * swx) / sw
            if slope > 0 and overhead >= 0:
                cal["transformer_flops_per_s"] = 1.0 / slope
                cal["step_overhead_s"] = overhead
    if steps:
        cal["transformer_act_bytes_per_token"] = max(r["activation_bytes"] / (r["batch"] * r["tokens"]) for r in steps)
    base = _ok(rows, "denoising_step", height=1024, width=1024, batch=1, weights="bf16")
    base = [r for r in base if "attention" not in r and "streaming" not in r]
    fp8 = _ok(rows, "denoising_step", weights="fp8_layerwise")
    if base and fp8:
        cal["fp8_compute_factor"] = fp8[0]["seconds"] / base[0]["seconds"]
    math_rows = {r.get("chunk"): r for r in _ok(rows, "denoising_step", attention="math")}
    if None in math_rows and base:
        extra = math_rows[None]["activation_bytes"] - base[0]["activation_bytes"]
        if extra > 0:
            cal["attention_score_bytes"] = extra / (24 * 4608 * 4608)
    # Streaming: t = smooth_max_p(compute, copy) + overhead, fitted over the bf16 streaming points
    # (compute = the resident step; copy = streamed bytes / pinned bandwidth).
    st = [r for r in _ok(rows, "denoising_step", storage=None) if str(r.get("streaming", "")).startswith("resident=")]
    if st and base and bw.get("pinned"):
        c = base[0]["seconds"]
        pts = [(c, r["streamed_bytes"] / bw["pinned"], r["seconds"]) for r in st]
        best: tuple[float, float, float] | None = None
        for pi in range(20, 161):
            p = pi / 10
            for oi in range(0, 41):
                o = oi / 2000
                err = 0.0
                for cc, ss, t in pts:
                    hi = max(cc, ss)
                    pred = hi * ((cc / hi) ** p + (ss / hi) ** p) ** (1 / p) + o
                    err += ((pred - t) / t) ** 2
                if best is None or err < best[0]:
                    best = (err, p, o)
        if best is not None:
            cal["stream_overlap_exponent"] = best[1]
            cal["stream_overhead_s"] = best[2]
    st8 = _ok(rows, "denoising_step", streaming="resident=28", storage="fp8")
    st28 = _ok(rows, "denoising_step", streaming="resident=28", storage=None)
    if st8 and st28 and base and st8[0].get("decoded_bytes"):
        # Decoding every encoded block (resident ones too) each step: the fp8 step minus what the same
        # step would cost without decoding (its copies are smaller than the bf16 ones, and hidden).
        extra_s = st8[0]["seconds"] - max(base[0]["seconds"], st8[0]["streamed_bytes"] / bw.get("pinned", 55e9))
        if extra_s > 0:
            cal["decode_bandwidth"] = st8[0]["decoded_bytes"] / extra_s
    # Text encoders.
    t5 = {r["tokens"]: r for r in _ok(rows, "text_encoding", model="t5-xxl") if "streaming" not in r}
    if 512 in t5:
        cal["t5_seconds_512"] = t5[512]["seconds"]
    if 256 in t5 and 512 in t5:
        a1, a2 = t5[256]["activation_bytes"], t5[512]["activation_bytes"]
        # a = L*p + L^2*q at L=256 and 512.
        q = (a2 - 2 * a1) / (512 * 512 - 2 * 256 * 256)
        q = max(0.0, q)
        p = max(0.0, (a2 - q * 512 * 512) / 512)
        cal["t5_act_bytes_per_token"] = p
        cal["t5_act_bytes_per_token_sq"] = q
    clip = _ok(rows, "text_encoding", model="clip-l")
    if clip:
        cal["clip_seconds"] = clip[0]["seconds"]
    # VAE.
    plain = [r for r in _ok(rows, "vae_decode", tile=None, slicing=False)]
    if plain:
        cal["vae_decode_bytes_per_pixel"] = max(
            r["activation_bytes"] / (r["batch"] * r["height"] * r["width"]) for r in plain
        )
    d1 = [r for r in plain if r["batch"] == 1 and r["height"] == r["width"] == 1024]
    d2 = [r for r in plain if r["batch"] == 1 and r["height"] == r["width"] == 2048]
    if d1:
        cal["vae_decode_seconds_1mp"] = d1[0]["seconds"]
    if d1 and d2:
        cal["vae_decode_time_exponent"] = math.log(d2[0]["seconds"] / d1[0]["seconds"]) / math.log(4)
    enc = _ok(rows, "vae_encode")
    if enc:
        px = enc[0]["height"] * enc[0]["width"]
        cal["vae_encode_bytes_per_pixel"] = enc[0]["activation_bytes"] / px
        cal["vae_encode_seconds_1mp"] = enc[0]["seconds"] * 1048576 / px
    names = {f.name for f in dataclasses.fields(Calibration)}
    cal = {k: v for k, v in cal.items() if k in names}
    cal["device_name"] = device_name
    cal["source"] = f"benchmarks/calibrate.py on {device_name}, {time.strftime('%Y-%m-%d')}"
    not_measured = sorted(names - set(cal))
    return cal, not_measured


# ------------------------------------------------------------------------------------------------


def _versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("diffusers", "transformers", "accelerate"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001
            out[pkg] = None
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'stage':<16} {'configuration':<52} {'ms':>9} {'act GB':>8} {'peak GB':>8}"]
    for r in rows:
        cfg = _cfg(
            {
                k: v
                for k, v in r.items()
                if k
                in (
                    "model",
                    "tokens",
                    "height",
                    "width",
                    "batch",
                    "weights",
                    "attention",
                    "chunk",
                    "streaming",
                    "storage",
                    "tile",
                    "slicing",
                    "memory",
                )
            }
        )
        if r.get("ok") and r.get("stage") == "h2d_bandwidth":
            lines.append(f"{r['stage']:<16} {cfg:<52} {r['bytes_per_s'] / 1e9:>8.1f} GB/s")
        elif r.get("ok"):
            lines.append(
                f"{r['stage']:<16} {cfg:<52} {r['seconds'] * 1e3:>9.1f} {r['activation_bytes'] / 1e9:>8.2f} "
                f"{r['peak_allocated'] / 1e9:>8.2f}"
            )
        else:
            lines.append(f"{r['stage']:<16} {cfg:<52} {r.get('error', 'failed'):>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="output JSON (default: $OUT/calibration.json, else ./out/calibration.json)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per configuration (median; default 3)")
    parser.add_argument("--quick", action="store_true", help="skip streaming and the 2048^2 configurations")
    parser.add_argument(
        "--only", default="bandwidth,text,transformer,controlnet,vae", help="comma-separated stages to run"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("calibrate.py needs a CUDA device", file=sys.stderr)
        return 2
    out_path = Path(args.out) if args.out else Path(os.environ.get("OUT", "out")) / "calibration.json"
    started = time.time()
    device_name = torch.cuda.get_device_name()
    log(f"{device_name}, torch {torch.__version__}, {_versions().get('diffusers')=}")
    only = set(args.only.split(","))
    rec = Recorder(args.reps)
    bw: dict[str, float] = {}
    stages: list[tuple[str, Callable[[], Any]]] = [
        ("bandwidth", lambda: bw.update(bandwidth(rec))),
        ("text", lambda: text_encoders(rec)),
        ("transformer", lambda: transformer(rec, args.quick)),
        ("controlnet", lambda: controlnet(rec)),
        ("vae", lambda: vae(rec, args.quick)),
    ]
    for name, fn in stages:
        if name not in only:
            continue
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - keep what was measured so far
            rec.note_failure(name, {"phase": "stage"}, exc)
        gc.collect()
        torch.cuda.empty_cache()
    calibration, not_measured = fit(rec.rows, bw, device_name)
    result = {
        "device": device_name,
        "versions": _versions(),
        "command": " ".join([sys.executable, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "measurements": rec.rows,
        "calibration": calibration,
        "not_measured": not_measured,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, default=str))
    print()
    print(_table(rec.rows))
    print()
    for key, value in sorted(calibration.items()):
        print(f"  {key:<34} {value}")
    print(f"\nwrote {out_path} in {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
