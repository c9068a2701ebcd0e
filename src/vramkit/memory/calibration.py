"""The measured constants of the cost model, in one dataclass.

The built-in defaults come from ``shared/flux-facts.md``: one NVIDIA H200 (PCIe gen5 x16), torch
2.11.0+cu130, diffusers 0.42.1, full-size FLUX.1-dev with random bf16 weights. Each field says where
it came from; "assumed" marks a figure nobody measured yet. ``benchmarks/calibrate.py`` measures them
on a GPU and writes a JSON file that :meth:`Calibration.load` reads (``VRAMKIT_CALIBRATION`` or
``benchmarks/results/calibration.json`` in a source checkout), so one GPU run refines the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Calibration", "DEFAULT_CALIBRATION_PATH", "CALIBRATION_ENV"]

logger = logging.getLogger("vramkit")

#: Environment variable naming a calibration JSON file.
CALIBRATION_ENV = "VRAMKIT_CALIBRATION"
#: Where a source checkout keeps the calibration written by ``benchmarks/calibrate.py``.
DEFAULT_CALIBRATION_PATH = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "calibration.json"

_MiB = 1024**2
_GiB = 1024**3


@dataclass(frozen=True)
class Calibration:
    """Constants of the memory and time model. Sizes in bytes, times in seconds, rates per second."""

    source: str = (
        "built-in defaults: shared/flux-facts.md (NVIDIA H200, torch 2.11, diffusers 0.42.1), memory figures "
        "refined by benchmarks/calibrate.py on an H100 and an H200 (2026-11-22)"
    )
    device_name: str = "NVIDIA H200"

    # --- transfers -------------------------------------------------------------------------------
    #: pinned host->device copy of the calibration machine; flux-facts: 55.3 GB/s measured. Plans use
    #: the target's own figure (probe, cache or ``bandwidth=``), this one is for reference.
    pinned_bandwidth: float = 55.3e9
    #: pageable host->device (and back) for whole-module moves; flux-facts: 6-8 GB/s, and moving the
    #: 23.8 GB transformer took 3.37 s (7.06 GB/s).
    pageable_bandwidth: float = 7.0e9
    #: read + copy rate of blocks streamed from a memory-mapped offload file (``BlockStreaming(host=
    #: "disk")``): the page faults read the file and the copy to the GPU runs from pageable memory, one
    #: after the other. ASSUMED, not measured: a mid-range NVMe SSD (~3 GB/s sequential reads) through
    #: page faults; a SATA SSD gives ~0.5 GB/s, pages still in the page cache come at the pageable rate.
    #: Pass ``disk_bandwidth=`` to plan for another disk.
    disk_bandwidth: float = 2.0e9
    #: effective rate of accelerate's leaf-level sequential offload; flux-facts: 3.17 s/step for
    #: 23.8 GB of weights (7.5 GB/s, compute included).
    sequential_bandwidth: float = 7.5e9

    # --- transformer compute -------------------------------------------------------------------
    #: effective bf16 throughput for the FLUX FLOP count; fitted to the resident bf16 steps of
    #: flux-facts (0.179 s at 1024^2, 0.065 s at 512^2) together with ``step_overhead_s``.
    transformer_flops_per_s: float = 752.6e12
    #: fixed time per transformer forward (launches, norms, RoPE); same fit.
    step_overhead_s: float = 0.0146
    #: compute slowdown with fp8 storage (diffusers' layerwise upcast, as StoreFP8); flux-facts:
    #: 0.208/0.179 = 1.16; calibrate.py on an H200: 0.206/0.174 = 1.18 (used), H100: 1.20.
    fp8_compute_factor: float = 1.18
    #: rate at which the streaming engine decodes fp8/int8/cast blocks (resident ones too) into the
    #: compute dtype each forward, in decoded bytes per second. With the engine's fused Triton kernel,
    #: benchmarks/results/streaming_1024_h200.json: fp8 all resident 0.1838 s/step vs bf16 0.1724 s,
    #: so 23.7 GB decoded in 11.5 ms = 2.06e12 B/s on an H200 (the PyTorch fallback measured by
    #: calibrate.py before the kernel: 265 GB/s on an H200, 250 GB/s on an H100).
    decode_bandwidth: float = 2.0e12
    #: compute slowdown of an int8 weight-only quantized resident model (no compile); assumed from
    #: flux-facts' quanto qfloat8 (1.62x) and torchao float8 (1.47x) figures.
    int8_compute_factor: float = 1.45
    #: compute slowdown of nf4 weights (bitsandbytes); assumed.
    nf4_compute_factor: float = 1.6
    #: compute slowdown of fp32 weights against bf16 (no TF32); assumed.
    fp32_compute_factor: float = 8.0
    #: smooth maximum exponent p for overlapped copy and compute, t = (c^p + s^p)^(1/p); refitted once
    #: resident blocks were placed by compute (streaming_1024_balanced_h200.json: 0.179 s at 16 GiB where
    #: c=0.172 and s=0.164, 0.187 s where s=0.186; 1.00-1.01x of the larger term elsewhere). The even-by-count
    #: placement before it needed p=4.5 (0.206 s at 16 GiB in flux-facts' table).
    stream_overlap_exponent: float = 11.0
    #: fixed time per streamed forward (events, pre-hooks); streaming table of flux-facts.
    stream_overhead_s: float = 0.004
    #: a plan across several devices is chosen only when it is predicted this much faster per call
    #: than the best one-device plan: it adds cross-device hops the model does not price (2 x H200,
    #: 1024^2, 12 GiB each, fp8: predicted 0.197 vs 0.198 s/step, measured 0.187 two-GPU vs 0.171
    #: one-GPU; lossless, predicted 0.269 vs 0.301, measured 0.254 vs 0.289: benchmarks/results/multi_gpu_*).
    multi_device_min_gain: float = 0.05
    #: extra time per additional query chunk per attention layer with AttentionSlicing; assumed.
    attention_chunk_overhead_s: float = 2.0e-5

    # --- transformer memory --------------------------------------------------------------------
    #: activation + workspace peak per token per image of one transformer forward (flash/efficient
    #: SDPA, no N^2 term); flux-facts: resident peak 24.3 GB - 23.8 GB weights at 4608 tokens.
    transformer_act_bytes_per_token: float = 108_000.0
    #: bytes per attention score element when scores are materialized (math SDPA: bf16 scores, fp32
    #: softmax, copies); calibrate.py: 4.6 GB more than flash for 24 x 4608^2 scores = 9.06.
    attention_score_bytes: float = 9.06
    #: whether CUDA SDPA materializes the score matrix (False: flash / memory-efficient kernels).
    cuda_attention_materializes_scores: bool = False

    # --- text encoders -------------------------------------------------------------------------
    #: T5-XXL encode time on the GPU at 512 tokens; flux-facts: 0.03 s.
    t5_seconds_512: float = 0.03
    #: CLIP-L encode time; calibrate.py: 4.4 ms (H200), 8.1 ms (H100).
    clip_seconds: float = 0.0045
    #: T5 activations per token (linear part) and per token^2 (attention + position bias); flux-facts:
    #: 9.8 GB peak incl. 9.5 GB weights at 512 tokens; calibrate.py: +0.11 GB at 256 tokens and
    #: +0.24 GB at 512 (H100 and H200 alike), which these two terms reproduce.
    t5_act_bytes_per_token: float = 377_000.0
    t5_act_bytes_per_token_sq: float = 192.0

    # --- VAE -----------------------------------------------------------------------------------
    #: decode activation peak per output pixel per image; flux-facts: 2.76 GB at 1024^2 and 10.4 GB
    #: at 2048^2, less 0.17 GB of weights (2470 and 2440 B/px).
    vae_decode_bytes_per_pixel: float = 2470.0
    #: decode time of one 1024^2 image and its growth with pixels; flux-facts: 0.086 s at 1024^2,
    #: 0.39 s at 2048^2 (exponent log(0.39/0.086)/log(4) = 1.09).
    vae_decode_seconds_1mp: float = 0.086
    vae_decode_time_exponent: float = 1.09
    #: encode activation peak per input pixel and time per megapixel (Fill/Kontext/ControlNet);
    #: calibrate.py at 1024^2: +1.61 GB (1536 B/px), 0.047 s (H200).
    vae_encode_bytes_per_pixel: float = 1540.0
    vae_encode_seconds_1mp: float = 0.047
    #: fixed time per decoded tile; assumed (calibrate.py's 512 px tiles fit the model within 10%).
    vae_tile_overhead_s: float = 0.002

    # --- allocator and host --------------------------------------------------------------------
    #: added to every predicted VRAM peak: the caching allocator's fragmentation and cuBLAS/cuDNN
    #: workspaces (torch's ``max_memory_allocated`` does not see them); assumed. Without memory
    #: pressure calibrate.py saw reserved exceed allocated by 1-9% in transformer steps and by 60-90%
    #: in VAE decodes (the allocator caches freed blocks; under pressure it releases them and retries).
    allocator_reserve_bytes: int = 384 * _MiB
    allocator_reserve_fraction: float = 0.05
    #: allocated bytes every stage holds besides weights and activations: cuBLAS/cuBLASLt workspaces
    #: and small runtime buffers handed out on the first matmul. The H200 grid
    #: (benchmarks/results/grid_flux-dev_h200.json) measured peaks 0-70 MiB above the model without it.
    runtime_workspace_bytes: int = 48 * _MiB
    #: ControlNet residual tensors alive at once during a step of a multi-ControlNet (two or more
    #: controls; one control: 2). Fitted to the H200 grid of a two-mode union ControlNet
    #: (benchmarks/results/grid_flux-dev_controlnet-union_h200.json: 1.2 and 1.5 residual sets above
    #: the one-control model at 1024^2 and 2048^2).
    multi_control_residual_copies: float = 3.5
    #: resident set of the Python process with torch, CUDA and diffusers loaded, before any weight:
    #: the H200 profile at 8 GiB (benchmarks/results/profile_8gib_1024x1024_h200.json) and the
    #: sequential-offload rows of the grid measured 0.7-0.8 GiB above the 1.5 GiB first assumed.
    host_baseline_bytes: int = int(2.3 * _GiB)
    #: whether the pipeline batches the true-CFG negative pass with the positive one (diffusers'
    #: FluxPipeline runs them one after the other, so activations do not double).
    true_cfg_batched: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Build from a dict of fields (or ``{"calibration": {...}}`` as ``calibrate.py`` writes);
        unknown keys are ignored with a log message, missing ones keep their defaults."""
        if "calibration" in data and isinstance(data["calibration"], dict):
            data = data["calibration"]
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            f = names.get(key)
            if f is None:
                logger.debug("calibration: ignoring unknown key %r", key)
                continue
            default = f.default
            if isinstance(default, bool):
                kwargs[key] = bool(value)
            elif isinstance(default, int):
                kwargs[key] = int(value)
            elif isinstance(default, float):
                kwargs[key] = float(value)
            else:
                kwargs[key] = str(value)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Calibration:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> Calibration:
        """The calibration to plan with: ``path``, else ``$VRAMKIT_CALIBRATION``, else
        ``benchmarks/results/calibration.json`` of a source checkout, else the built-in defaults.
        A file that cannot be read is logged and the defaults are used."""
        candidates: list[Path] = []
        if path is not None:
            candidates.append(Path(path))
        elif os.environ.get(CALIBRATION_ENV):
            candidates.append(Path(os.environ[CALIBRATION_ENV]))
        else:
            candidates.append(DEFAULT_CALIBRATION_PATH)
        for candidate in candidates:
            if not candidate.is_file():
                if path is not None or candidate != DEFAULT_CALIBRATION_PATH:
                    logger.warning("calibration file %s not found; using built-in defaults", candidate)
                continue
            try:
                cal = cls.from_json(candidate)
            except (OSError, ValueError, TypeError) as exc:
                logger.warning("could not read calibration %s (%s); using built-in defaults", candidate, exc)
                continue
            logger.debug("calibration loaded from %s", candidate)
            return cal
        return cls()
