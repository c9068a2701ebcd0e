"""Measure vramkit.profile's overhead on the tiny pipelines (not a test; run it by hand).

    PYTHONPATH=src HF_HUB_OFFLINE=1 python tests/profiling/overhead.py [--device cuda] [--n 60]

Calls are interleaved (unprofiled, then each profiled variant) and the medians compared, so drift
on a shared machine hits every variant alike. Prints one line per (kind, steps).
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def measure(kind: str, steps: int, n: int, device: str) -> str:
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
    base = statistics.median(times["unprofiled"])
    parts = [f"{kind} on {device}, {steps} steps, median of {n}: unprofiled {base * 1e3:.2f} ms"]
    for name in VARIANTS:
        m = statistics.median(times[name])
        parts.append(f"{name} {m * 1e3:.2f} ms ({(m - base) * 1e3:+.2f} ms, {100 * (m / base - 1):+.1f}%)")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for kind, steps in (("flux", 2), ("flux", 20), ("controlnet", 2)):
        print(measure(kind, steps, args.n, args.device), flush=True)


if __name__ == "__main__":
    main()
