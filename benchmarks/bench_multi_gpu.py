"""Two GPUs vs one: FLUX.1-dev at 1024^2, the best one-GPU plan at 12 GiB against the two-GPU plan at
2 x 12 GiB (issue #7, "Several GPUs").

Each configuration runs in its own process: it builds the full-size FLUX.1-dev pipeline with random
bf16 weights (``vramkit.testing.full_size.full_size_flux_pipeline``), moves it to host RAM, allocates a
ballast on every GPU the configuration uses so that ``torch.cuda.mem_get_info(d)`` reports exactly
the budget free there (any overshoot is a real CUDA OOM), then ``vramkit.optimize``s and times a
2-step and an N-step call: s/step is their difference over N - 2, s/image is extrapolated to 28 steps.
Peak VRAM per device is ``max_memory_allocated(d)`` minus that device's ballast; peak host RSS is
sampled. Writes ``$OUT/multi_gpu_<size>.json`` (device names, torch/diffusers versions, the command,
predicted vs measured) and prints a table.

    PYTHONPATH=src:/tmp/site python3 benchmarks/bench_multi_gpu.py            # 2 GPUs, ~3-5 minutes
    PYTHONPATH=src python3 benchmarks/bench_multi_gpu.py --tiny                # harness check on CPU

``--tiny`` runs the tiny CPU pipeline with both "devices" mapped to the CPU (the plan is made for
two GPUs, its placements are applied with ``device="cpu"``): it checks the harness, not speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import RssSampler, build  # noqa: E402

GIB = 1024**3
CONFIGS = {
    "one-gpu": "best one-GPU plan: vramkit.optimize(pipe, vram=BUDGET, device='cuda:0')",
    "two-gpu": "two-GPU plan: vramkit.optimize(pipe, vram={'cuda:0': BUDGET, 'cuda:1': BUDGET})",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def devices_of(config: str) -> list[str]:
    return ["cuda:0"] if config == "one-gpu" else ["cuda:0", "cuda:1"]


def apply_config(pipe: Any, config: str, budget: str, tiny: bool) -> Any:
    import vramkit

    kwargs: dict[str, Any] = dict(height=ARGS.size, width=ARGS.size, quality=ARGS.quality)
    if not tiny:
        if config == "one-gpu":
            return vramkit.optimize(pipe, vram=budget, device="cuda:0", **kwargs)
        return vramkit.optimize(pipe, vram={d: budget for d in devices_of(config)}, **kwargs)
    # Tiny: plan for the GPUs (a plan needs no GPU), apply its placements with every device -> cpu.
    vram: Any = budget if config == "one-gpu" else {d: budget for d in devices_of(config)}
    plan = vramkit.plan(pipe, vram=vram, bandwidth="25GB/s", ram="16GiB", **kwargs)
    strategies = []
    for step in plan.steps:
        s = step.strategy
        if any(f.name == "device" for f in dataclasses.fields(s)) and s.device is not None:
            s = dataclasses.replace(s, device="cpu")
        if s not in strategies:
            strategies.append(s)
    vramkit.optimize(pipe, strategies=strategies)
    return plan


def call(pipe: Any, steps: int, tiny: bool) -> float:
    kwargs: dict[str, Any] = dict(
        prompt="a red fox in the snow",
        num_inference_steps=steps,
        guidance_scale=3.5,
        height=ARGS.size,
        width=ARGS.size,
        output_type="pt",
        generator=torch.Generator("cpu").manual_seed(0),
    )
    if tiny:
        kwargs.update(max_sequence_length=16)
    sync()
    start = time.perf_counter()
    pipe(**kwargs)
    sync()
    return time.perf_counter() - start


def sync() -> None:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def run_one(config: str, budget_gib: float) -> dict[str, Any]:
    tiny = ARGS.tiny
    result: dict[str, Any] = {"config": config, "budget_gib": budget_gib, "description": CONFIGS[config]}
    budget = f"{budget_gib}GiB"
    ballast: dict[str, int] = {}
    keep: list[torch.Tensor] = []
    try:
        pipe = build(tiny)
        if not tiny:
            torch.cuda.set_device("cuda:0")
            for d in devices_of(config):
                torch.empty(1, device=d)  # the CUDA context first: it is not part of the budget
                free = torch.cuda.mem_get_info(d)[0]
                extra = free - int(budget_gib * GIB)
                if extra > 0:
                    keep.append(torch.empty(extra, dtype=torch.uint8, device=d))
                ballast[d] = max(0, extra)
                result.setdefault("free_after_ballast", {})[d] = torch.cuda.mem_get_info(d)[0]
        plan = apply_config(pipe, config, budget, tiny)
        result["plan"] = plan.to_dict()
        result["plan_text"] = plan.explain()
        p = plan.predicted
        if p is not None:
            result["predicted_seconds_per_step"] = p.seconds_per_step
            result["predicted_seconds_per_image"] = p.seconds_per_image
            by_dev = p.peak_vram_by_device or {devices_of(config)[0]: p.peak_vram}
            result["predicted_peak_vram_gib"] = {d: v / GIB for d, v in by_dev.items()}
        with RssSampler() as rss:
            call(pipe, 2, tiny)  # warm-up: text encoders, first copies, allocator
            if not tiny:
                for d in devices_of(config):
                    torch.cuda.reset_peak_memory_stats(d)
            t2 = call(pipe, 2, tiny)
            tn = call(pipe, ARGS.steps, tiny)
        per_step = (tn - t2) / (ARGS.steps - 2)
        result.update(
            status="ok",
            seconds_2_steps=t2,
            seconds_n_steps=tn,
            n_steps=ARGS.steps,
            seconds_per_step=per_step,
            seconds_per_image_28=t2 + 26 * per_step,
            peak_host_rss_gib=rss.peak / GIB,
        )
        if not tiny:
            result["peak_vram_gib"] = {
                d: (torch.cuda.max_memory_allocated(d) - ballast[d]) / GIB for d in devices_of(config)
            }
            result["peak_reserved_gib"] = {
                d: (torch.cuda.max_memory_reserved(d) - ballast[d]) / GIB for d in devices_of(config)
            }
    except Exception as exc:  # a benchmark records every failure (OOM included) and goes on
        result.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000])
    return result


def environment() -> dict[str, Any]:
    import diffusers

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "command": " ".join([sys.executable, *sys.argv]),
        "host_ram_gib": psutil.virtual_memory().total / GIB,
    }
    if torch.cuda.is_available():
        env["devices"] = {
            f"cuda:{i}": {
                "name": torch.cuda.get_device_name(i),
                "total_vram_gib": torch.cuda.mem_get_info(i)[1] / GIB,
            }
            for i in range(torch.cuda.device_count())
        }
    return env


def _fmt(d: Any) -> str:
    if not isinstance(d, dict):
        return "-"
    return " ".join(f"{k[-1]}:{v:.2f}" for k, v in d.items())


def print_table(results: list[dict[str, Any]]) -> None:
    print(
        f"{'config':<8} {'status':<6} {'s/step':>7} {'pred':>6} {'s/img28':>8} {'pred':>6}  "
        f"{'VRAM GiB by device':<20} {'predicted':<20} {'RSS':>5}"
    )
    for r in results:
        print(
            f"{r['config']:<8} {r.get('status', '?'):<6} {r.get('seconds_per_step', float('nan')):>7.3f} "
            f"{r.get('predicted_seconds_per_step', float('nan')):>6.3f} "
            f"{r.get('seconds_per_image_28', float('nan')):>8.2f} "
            f"{r.get('predicted_seconds_per_image', float('nan')):>6.2f}  "
            f"{_fmt(r.get('peak_vram_gib')):<20} {_fmt(r.get('predicted_peak_vram_gib')):<20} "
            f"{r.get('peak_host_rss_gib', float('nan')):>5.1f}"
        )
        if r.get("status") != "ok":
            print(f"         {r.get('error', '')[:300]}")
    ok = {r["config"]: r for r in results if r.get("status") == "ok"}
    if "one-gpu" in ok and "two-gpu" in ok:
        a, b = ok["one-gpu"], ok["two-gpu"]
        print(
            f"two GPUs vs one: {a['seconds_per_step'] / b['seconds_per_step']:.2f}x per step, "
            f"{a['seconds_per_image_28'] / b['seconds_per_image_28']:.2f}x per image"
        )


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--budget", type=float, default=12.0, help="GiB per GPU")
    p.add_argument("--configs", default="one-gpu,two-gpu")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--quality", default="auto", choices=("auto", "lossless"))
    p.add_argument("--timeout", type=int, default=200, help="seconds per configuration")
    p.add_argument("--tiny", action="store_true", help="check the harness on the tiny CPU pipeline")
    p.add_argument("--one", help=argparse.SUPPRESS)
    ARGS = p.parse_args()
    if ARGS.tiny and ARGS.size == 1024:
        ARGS.size = 32
    if ARGS.one:
        print("RESULT " + json.dumps(run_one(ARGS.one, ARGS.budget)), flush=True)
        return
    if not ARGS.tiny and (not torch.cuda.is_available() or torch.cuda.device_count() < 2):
        log("needs two CUDA devices (or --tiny)")
    results = []
    for config in ARGS.configs.split(","):
        log(f"{config} at {ARGS.budget} GiB per GPU")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--one",
            config,
            "--budget",
            str(ARGS.budget),
            "--size",
            str(ARGS.size),
            "--steps",
            str(ARGS.steps),
            "--quality",
            ARGS.quality,
        ]
        cmd += ["--tiny"] if ARGS.tiny else []
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ARGS.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                results.append(json.loads(lines[-1][7:]))
            else:
                results.append(
                    {"config": config, "budget_gib": ARGS.budget, "status": "crashed", "error": proc.stderr[-1500:]}
                )
        except subprocess.TimeoutExpired:
            results.append({"config": config, "budget_gib": ARGS.budget, "status": "timeout"})
        log(f"  -> {results[-1].get('status')} {results[-1].get('seconds_per_step', '')}")
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    payload = {"environment": environment(), "size": ARGS.size, "budget_gib": ARGS.budget, "results": results}
    path = os.path.join(out_dir, f"multi_gpu_{ARGS.size}{'_tiny' if ARGS.tiny else ''}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print_table(results)
    print(f"wrote {path}")


ARGS: argparse.Namespace
if __name__ == "__main__":
    main()
