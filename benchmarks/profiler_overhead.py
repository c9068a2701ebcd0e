"""Measure vramkit.profile's overhead on the tiny pipelines.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/profiler_overhead.py [--device cuda] [--n 60] \
        [--out benchmarks/results/profiler_overhead_cpu.json]

Calls are interleaved (unprofiled, then each profiled variant) and the medians compared, so drift
on a shared machine hits every variant alike. Prints one line per (kind, steps).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import torch

from vramkit.profiling import profile
from vramkit.testing import tiny_call_kwargs, tiny_pipeline

VARIANTS = {
    "profile()": {},
    "sample_interval=None": {"sample_interval": None},
    "sample_interval=0.001": {"sample_interval": 0.001},
    "sync=True": {"sync": True},
}


def _call(pipe, kind: str, steps: int, device: str) -> None:
    kwargs = tiny_call_kwargs(kind)
    kwargs["num_inference_steps"] = steps
    pipe(**kwargs)
    if device == "cuda":
        torch.cuda.synchronize()


def measure(kind: str, steps: int, n: int, device: str) -> dict[str, Any]:
    pipe = tiny_pipeline(kind).to(device)
    for _ in range(3):
        _call(pipe, kind, steps, device)
    times: dict[str, list[float]] = {"unprofiled": [], **{v: [] for v in VARIANTS}}
    for _ in range(n):
        start = time.perf_counter()
        _call(pipe, kind, steps, device)
        times["unprofiled"].append(time.perf_counter() - start)
        for name, options in VARIANTS.items():
            start = time.perf_counter()
            with profile(pipe, **options):
                _call(pipe, kind, steps, device)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"kind": kind, "steps": steps, "n": n, "device": device, "median_seconds": medians}


def describe(row: dict[str, Any]) -> str:
    base = row["median_seconds"]["unprofiled"]
    parts = [f"{row['kind']} on {row['device']}, {row['steps']} steps, median of {row['n']}: "
             f"unprofiled {base * 1e3:.2f} ms"]
    for name in VARIANTS:
        m = row["median_seconds"][name]
        parts.append(f"{name} {m * 1e3:.2f} ms ({(m - base) * 1e3:+.2f} ms, {100 * (m / base - 1):+.1f}%)")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier timings)")
    parser.add_argument("--out", help="write the medians as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for kind, steps in (("flux", 2), ("flux", 20), ("controlnet", 2)):
        rows.append(measure(kind, steps, args.n, args.device))
        print(describe(rows[-1]), flush=True)
    if args.out:
        import diffusers

        env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
               "command": " ".join(["python", *sys.argv]), "threads": args.threads,
               "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"}
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
