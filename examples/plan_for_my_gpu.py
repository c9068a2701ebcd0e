"""What would vramkit do on my GPU? Plan full-size FLUX for a budget without a GPU or any weights.

    python examples/plan_for_my_gpu.py --vram 8GiB
    python examples/plan_for_my_gpu.py --model flux-fill --vram 12GiB --size 1360x768 --ram 32GiB
    python examples/plan_for_my_gpu.py --vram 6GiB --json

The pipeline is built on PyTorch's meta device (exact shapes and sizes, no memory, under a second),
so this is the Python-API twin of ``vramkit plan``. The numbers printed are the planner's
predictions, not measurements. ``--full DIR`` plans your local diffusers folder instead (its weights
are loaded to host RAM; still nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import vramkit  # noqa: E402
from vramkit.errors import PlanInfeasibleError  # noqa: E402
from vramkit.memory.architectures import PIPELINE_MODELS  # noqa: E402


def parse_size(text: str) -> tuple[int, int]:
    """``"1360x768"`` -> ``(1360, 768)`` (width, height); one number means a square."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
    width = int(m.group(1))
    return width, int(m.group(2)) if m.group(2) else width


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-dev", choices=sorted(PIPELINE_MODELS), help="full-size model to plan")
    p.add_argument("--vram", help="GPU budget, e.g. 8GiB, 12GB, 80%% (default: free VRAM on this GPU)")
    p.add_argument("--ram", help="host RAM budget (default: available here; 64GiB assumed without a GPU)")
    p.add_argument("--size", type=parse_size, default=(1024, 1024), help="WIDTHxHEIGHT (default 1024x1024)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--quality", default="auto", choices=("auto", "lossless"))
    p.add_argument("--bandwidth", help="pinned host-to-device bandwidth, e.g. 25GB/s (default: measured or 25GB/s)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (Plan.to_json)")
    p.add_argument("--full", metavar="MODEL_DIR", help="plan a local diffusers FLUX folder instead (no download)")
    return p


def build_pipeline(args: argparse.Namespace) -> Any:
    if args.full:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(args.full, torch_dtype=torch.bfloat16, local_files_only=True)
    from vramkit.testing.full_size import full_size_flux_pipeline

    return full_size_flux_pipeline(args.model, device="meta")


def main(argv: list[str] | None = None) -> vramkit.Plan | None:
    """Print the plan and return it; on an infeasible budget print why (and the smallest budget
    that plans) and return ``None``."""
    args = build_parser().parse_args(argv)
    if args.vram is None and not torch.cuda.is_available():
        raise SystemExit("no GPU here: give --vram (e.g. --vram 8GiB) to plan for one")
    ram = args.ram or (None if torch.cuda.is_available() else "64GiB")
    width, height = args.size
    pipe = build_pipeline(args)
    try:
        plan = vramkit.plan(
            pipe,
            vram=args.vram,
            ram=ram,
            height=height,
            width=width,
            batch_size=args.batch,
            quality=args.quality,
            bandwidth=args.bandwidth,
        )
    except PlanInfeasibleError as exc:
        need = f" The smallest budget that plans: {exc.minimum_vram / 1024**3:.2f} GiB." if exc.minimum_vram else ""
        print(f"infeasible: {exc}{need}", file=sys.stderr)
        return None
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        label = args.full if args.full else f"{args.model} ({PIPELINE_MODELS[args.model].description})"
        print(f"# {label}, {width}x{height}; predictions are the planner's, not measurements")
        print(plan.explain())
    return plan


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
