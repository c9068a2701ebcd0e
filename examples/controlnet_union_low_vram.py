"""ControlNet Union with a low VRAM budget: the ControlNet is part of the plan.

    python examples/controlnet_union_low_vram.py                 # tiny offline pipeline
    python examples/controlnet_union_low_vram.py --full /models/FLUX.1-dev-ControlNet-Union --vram 12GiB
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
    from diffusers import FluxControlNetPipeline

    pipe, kwargs = load("controlnet-union", args, FluxControlNetPipeline)
    vram = args.vram or (None if torch.cuda.is_available() else "12GiB")
    plan = vramkit.optimize(pipe, vram=vram, height=kwargs["height"], width=kwargs["width"], quality=args.quality)
    print(plan.explain())
    images = pipe(**kwargs).images
    try:
        vramkit.restore(pipe)
    except vramkit.errors.IrreversibleError as exc:  # e.g. a bf16 cast of fp32 weights
        print("restore:", exc)
    return {"plan": plan, "images": images}


if __name__ == "__main__":
    main(sys.argv[1:])
