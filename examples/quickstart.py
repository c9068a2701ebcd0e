"""Quickstart: plan, apply, generate, explain, undo. Runs on a CPU with a tiny offline pipeline.

    python examples/quickstart.py                    # tiny pipeline, plans for an 8 GiB card
    python examples/quickstart.py --full /models/FLUX.1-dev --size 1024
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
    from diffusers import FluxPipeline

    pipe, kwargs = load("flux", args, FluxPipeline)
    vram = args.vram or (None if torch.cuda.is_available() else "8GiB")
    plan = vramkit.optimize(pipe, vram=vram, height=kwargs["height"], width=kwargs["width"], quality=args.quality)
    print(plan.explain())
    image = pipe(**kwargs).images
    try:
        vramkit.restore(pipe)
    except vramkit.errors.IrreversibleError as exc:  # e.g. a bf16 cast of fp32 weights
        print("restore:", exc)
    print("generated", tuple(image.shape) if isinstance(image, torch.Tensor) else image[0].size)
    return {"plan": plan, "images": image}


if __name__ == "__main__":
    main(sys.argv[1:])
