"""Peak host RAM of block streaming with a lossy storage: originals kept in RAM vs in the offload file.

Question: does ``BlockStreaming(storage="fp8", originals="disk")`` keep the process's peak RSS while
applying within what it held before (the weights), while ``originals="ram"`` grows it by the fp8
copy? (Restore is timed and sampled separately: it rebuilds the weights in RAM.) Runs the
engine on the CPU (``device="cpu"``, the same packing and release path as on a GPU, without the
pinning) or on CUDA, for a full-width FLUX transformer with ``--double``/``--single`` blocks, one
fresh process per mode. Writes ``$OUT/host_ram.json`` and prints a table.

    python benchmarks/bench_host_ram.py --double 4 --single 8 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_pipeline import RssSampler  # noqa: E402

GIB = 1024**3


def run_one(args: argparse.Namespace, originals: str) -> dict[str, Any]:
    from diffusers import FluxTransformer2DModel

    from vramkit.engine import enable_block_streaming

    torch.manual_seed(0)
    model = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, guidance_embeds=True)
    model = model.to(torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_before = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory(dir=args.offload_dir) as folder:
        with RssSampler(0.01) as rss:
            t0 = time.perf_counter()
            streamer = enable_block_streaming(
                model,
                resident=0,
                storage="fp8",
                device=args.device,
                originals=originals,
                offload_folder=folder,
            )
            apply_s = time.perf_counter() - t0
        after_apply = psutil.Process().memory_info().rss
        # Restore rebuilds the bf16 weights in RAM (the model as it was); with originals="disk" it reads
        # them through the mapped file, whose pages count in RSS while mapped (page cache, reclaimable).
        with RssSampler(0.01) as rss_restore:
            t0 = time.perf_counter()
            streamer.restore()
            restore_s = time.perf_counter() - t0
        after_restore = psutil.Process().memory_info().rss
    return {
        "originals": originals,
        "weights_gib": weights / GIB,
        "rss_before_gib": rss_before / GIB,
        "rss_after_apply_gib": after_apply / GIB,
        "peak_rss_gib": rss.peak / GIB,
        "peak_over_before": rss.peak / rss_before,
        "restore_peak_rss_gib": rss_restore.peak / GIB,
        "rss_after_restore_gib": after_restore / GIB,
        "apply_s": apply_s,
        "restore_s": restore_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--double", type=int, default=4, help="double-stream blocks (FLUX.1-dev: 19)")
    p.add_argument("--single", type=int, default=8, help="single-stream blocks (FLUX.1-dev: 38)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--offload-dir", default=None, help="where the offload file goes (default: the temp dir)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args, args.one)), flush=True)
        return
    rows = []
    for originals in ("ram", "disk"):
        cmd = [sys.executable, __file__, "--one", originals, "--double", str(args.double),
               "--single", str(args.single), "--device", args.device]
        if args.offload_dir:
            cmd += ["--offload-dir", args.offload_dir]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            rows.append({"originals": originals, "error": out.stderr[-2000:]})
            continue
        rows.append(json.loads(line[len("RESULT "):]))
    import diffusers

    on_cuda = args.device.startswith("cuda")
    payload = {
        "command": " ".join(["python"] + sys.argv),
        "device": torch.cuda.get_device_name() if on_cuda else f"cpu ({os.cpu_count()} cores, no GPU)",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "blocks": {"double": args.double, "single": args.single},
        "results": rows,
    }
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "host_ram.json"), "w") as f:
        json.dump(payload, f, indent=1)
    print(f"{'originals':>9} {'weights':>8} {'before':>7} {'peak':>7} {'after':>7} {'peak/before':>11} {'apply s':>8}"
          f" {'restore peak':>12} {'restored':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['originals']:>9} error: {r['error'][-300:]}")
            continue
        print(f"{r['originals']:>9} {r['weights_gib']:8.2f} {r['rss_before_gib']:7.2f} {r['peak_rss_gib']:7.2f} "
              f"{r['rss_after_apply_gib']:7.2f} {r['peak_over_before']:11.3f} {r['apply_s']:8.1f}"
              f" {r['restore_peak_rss_gib']:12.2f} {r['rss_after_restore_gib']:8.2f}")


if __name__ == "__main__":
    main()
