"""FLUX Fill (inpainting) with a low VRAM budget and memory report.

    python examples/fill_inpaint_low_vram.py                     # tiny offline pipeline
    python examples/fill_inpaint_low_vram.py --full /models/FLUX.1-Fill-dev --vram 8GiB
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import add_common_arguments, load


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    import vramkit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    from diffusers import FluxFillPipeline

    pipe, kwargs = load("fill", args, FluxFillPipeline)
    vram = args.vram or (None if torch.cuda.is_available() else "8GiB")
    plan = vramkit.optimize(pipe, vram=vram, height=kwargs["height"], width=kwargs["width"], quality=args.quality)
    print(plan.explain())
    with vramkit.profile(pipe) as prof:
        images = pipe(**kwargs).images
    print(prof.report())
    try:
        vramkit.restore(pipe)
    except vramkit.errors.IrreversibleError as exc:  # e.g. a bf16 cast of fp32 weights
        print("restore:", exc)
    return {"plan": plan, "images": images, "profile": prof}


if __name__ == "__main__":
    main(sys.argv[1:])
