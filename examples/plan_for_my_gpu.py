"""Which plan for my card, and why? Plans for the full-size model on the meta device: no GPU and
no weights needed (the same as `vramkit plan`).

    python examples/plan_for_my_gpu.py --vram 8GiB --size 1024 [--model flux-dev] [--quality lossless]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

MODELS = ("flux-dev", "flux-schnell", "flux-fill", "flux-kontext", "flux-dev+controlnet-union")


def main(argv: list[str] | None = None) -> Any:
    import vramkit
    from vramkit.testing.full_size import full_size_flux_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="flux-dev")
    parser.add_argument("--vram", default="8GiB")
    parser.add_argument("--ram", default="64GiB")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--quality", choices=("auto", "lossless"), default="auto")
    args = parser.parse_args(argv)
    pipe = full_size_flux_pipeline(args.model)  # meta device: exact sizes, no memory
    plan = vramkit.plan(pipe, vram=args.vram, ram=args.ram, height=args.size, width=args.size, quality=args.quality)
    print(plan.explain())
    return plan


if __name__ == "__main__":
    main(sys.argv[1:])
