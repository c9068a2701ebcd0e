"""Is a compiled, block-streamed FLUX.1-dev transformer step faster than the uncompiled one, with no
recompilation after warm-up? (issue #7)

Run on the GPU machine from the repository root:

    PYTHONPATH=src:/tmp/site python3 benchmarks/bench_compile.py --size 1024 --budget 8

The full-size FLUX.1-dev transformer (random bf16 weights) is built on the GPU and moved to host RAM;
a ballast leaves exactly ``--budget`` GiB free. The engine keeps as many blocks resident as the
budget allows (as ``bench_streaming.py`` does) and streams the rest. Measured, in one process, on the
same streamer: uncompiled steps, then the repeated blocks compiled the way vramkit's ``Compile``
strategy does it (beneath the streaming hooks, one compiled function per block class; no CUDA-graph
mode, since streamed weights move), warm-up steps (compilation), then measured steps. Recompilation is read
from torch._dynamo's counters: the number of compiled frames must not grow during the measured
steps. Output is compared with the uncompiled step (inductor fuses kernels: a small difference is
expected, reported as relative L2 error). Writes ``$OUT/compile_<size>.json`` and prints a table.

``--tiny`` runs the harness on the tiny CPU transformer with the ``eager`` backend (to check the
script, not to measure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_streaming import GIB, Ballast, error_vs, log, make_inputs  # noqa: E402


def compiled_frames() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["stats"].values())) if "stats" in counters else 0


def frame_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {k: int(v) for k, v in counters["stats"].items()}


def timed_steps(
    model: torch.nn.Module, inputs: dict[str, Any], steps: int, cuda: bool
) -> tuple[list[float], torch.Tensor]:
    times = []
    out = None
    with torch.inference_mode():
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(**inputs)[0]
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    assert out is not None
    return times, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--budget", type=float, default=8.0, help="GiB")
    p.add_argument("--storage", default=None, help="None (as loaded), fp8 or int8")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--mode", default=None, help="torch.compile mode (no CUDA-graph modes with streaming)")
    p.add_argument("--activation-gib", type=float, default=1.2, help="kept free for activations")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    from vramkit.engine import BlockStreamer
    from vramkit.engine.planning import max_resident_for_budget
    from vramkit.strategies.compile import _compile_block, repeated_blocks

    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    import diffusers

    result: dict[str, Any] = {
        "command": "python3 " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "size": args.size,
        "budget_gib": args.budget,
        "storage": args.storage,
        "backend": args.backend,
        "mode": args.mode,
    }
    if args.tiny:
        from vramkit.testing import tiny_pipeline

        model = tiny_pipeline("flux").transformer
        size = 32
        inputs = _tiny_inputs(model)
    else:
        from vramkit.memory.architectures import build_architecture

        torch.manual_seed(0)
        model = build_architecture("flux-dev", device="cuda", dtype=torch.bfloat16)
        model.to("cpu")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        size = args.size
        inputs = make_inputs(size, "cuda")
    model.eval()
    ballast = Ballast(int(args.budget * GIB)) if cuda else None
    streamer = None
    undo_compile: list[Any] = []
    try:
        weights_budget = int((args.budget - args.activation_gib) * GIB) - max(
            384 * 2**20, int(0.03 * args.budget * GIB)
        )
        layout = max_resident_for_budget(model, weights_budget if cuda else 10**12, 1, args.storage)
        if not cuda:
            from vramkit.engine import compute_layout

            layout = compute_layout(model, 1, 1, args.storage)
        streamer = BlockStreamer(model, layout, device=device).start()
        result["resident_blocks"] = len(layout.resident_positions)
        result["streamed_blocks"] = len(layout.streamed_positions)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        timed_steps(model, inputs, args.warmup, cuda)
        plain, ref = timed_steps(model, inputs, args.steps, cuda)
        result["uncompiled_s_per_step"] = statistics.median(plain)
        log(f"uncompiled: {result['uncompiled_s_per_step']:.4f} s/step")

        blocks = repeated_blocks(model)
        kwargs: dict[str, Any] = {"backend": args.backend}
        if args.mode:
            kwargs["mode"] = args.mode
        shared: dict[type, Any] = {}
        undo_compile = [_compile_block(block, kwargs, shared) for block in blocks]
        result["compiled_blocks"] = len(blocks)
        t0 = time.perf_counter()
        warm, _ = timed_steps(model, inputs, args.warmup, cuda)
        result["warmup_seconds"] = time.perf_counter() - t0
        result["warmup_step_seconds"] = warm
        frames_before = compiled_frames()
        counts_before = frame_counts()
        fast, out = timed_steps(model, inputs, args.steps, cuda)
        result["compiled_s_per_step"] = statistics.median(fast)
        result["compiled_step_seconds"] = fast
        result["frames_compiled_during_measure"] = compiled_frames() - frames_before
        result["dynamo_stats_before"] = counts_before
        result["dynamo_stats_after"] = frame_counts()
        result["no_recompilation"] = result["frames_compiled_during_measure"] == 0
        result["speedup"] = result["uncompiled_s_per_step"] / result["compiled_s_per_step"]
        result.update(error_vs(ref.cpu(), out.cpu()))
        if cuda:
            result["peak_alloc_gib"] = (torch.cuda.max_memory_allocated() - (ballast.nbytes if ballast else 0)) / GIB
        result["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a benchmark records every failure
        result["status"] = "error"
        result["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    finally:
        for restore in reversed(undo_compile):
            restore()
        if streamer is not None:
            streamer.restore()
        if ballast is not None:
            ballast.release()
    path = os.path.join(out_dir, f"compile_{size}{'_tiny' if args.tiny else ''}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    keys = (
        "status",
        "resident_blocks",
        "uncompiled_s_per_step",
        "compiled_s_per_step",
        "speedup",
        "frames_compiled_during_measure",
        "rel_l2_err",
        "peak_alloc_gib",
        "error",
    )
    for k in keys:
        if k in result:
            print(f"{k:>32}: {result[k]}")
    log(f"wrote {path}")


def _tiny_inputs(model: torch.nn.Module) -> dict[str, Any]:
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    n, t = 16, 8
    return dict(
        hidden_states=torch.randn(1, n, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, t, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None,
        img_ids=torch.zeros(n, 3),
        txt_ids=torch.zeros(t, 3),
        return_dict=False,
    )


if __name__ == "__main__":
    main()
