"""FLUX Fill (or inpainting) with a low VRAM budget, and the profiler's memory report.

    python examples/fill_inpaint_low_vram.py                       # tiny Fill pipeline
    python examples/fill_inpaint_low_vram.py --pipeline inpaint    # tiny FluxInpaintPipeline
    python examples/fill_inpaint_low_vram.py --full /models/FLUX.1-Fill-dev --image park.png --mask mask.png --vram 8GiB

White in the mask is repainted, black is kept. Fill (FLUX.1-Fill-dev) takes the masked image as
extra transformer input; inpaint (FLUX.1-dev + FluxInpaintPipeline) starts from the noised image
(``--strength``). Both VAE-encode the image first, a stage the planner counts.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import add_common_arguments, load


def synthetic_inputs(size: int) -> tuple[Any, Any]:
    """A gradient 'photo' and a mask whose white centre square is repainted."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = np.stack(
        [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 96, np.uint8)], -1
    )
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: -size // 4, size // 4: -size // 4] = 255
    return Image.fromarray(rgb, "RGB"), Image.fromarray(mask, "L")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    import vramkit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--pipeline", choices=("fill", "inpaint"), default="fill")
    parser.add_argument("--image", help="image file (default: synthetic)")
    parser.add_argument("--mask", help="mask file, white = repaint (default: a centre square)")
    parser.add_argument("--strength", type=float, default=0.85, help="inpaint only")
    args = parser.parse_args(argv)
    from diffusers import FluxFillPipeline, FluxInpaintPipeline
    from PIL import Image

    cls = FluxFillPipeline if args.pipeline == "fill" else FluxInpaintPipeline
    pipe, kwargs = load(args.pipeline, args, cls)
    image, mask = synthetic_inputs(kwargs["height"])
    if args.image:
        image = Image.open(args.image).convert("RGB")
    if args.mask:
        mask = Image.open(args.mask).convert("L")
    kwargs.update(image=image, mask_image=mask)
    if args.pipeline == "inpaint":
        kwargs["strength"] = args.strength

    vram = args.vram or (None if torch.cuda.is_available() else "8GiB")
    plan = vramkit.optimize(pipe, vram=vram, height=kwargs["height"], width=kwargs["width"], quality=args.quality)
    print(plan.explain())
    with vramkit.profile(pipe) as prof:  # measured time and memory per stage, next to the prediction
        images = pipe(**kwargs).images
    print(prof.report())
    try:
        vramkit.restore(pipe)
    except vramkit.errors.IrreversibleError as exc:  # fp8/int8 storage stays: the pipeline still works
        print("restore:", exc)
    return {"plan": plan, "images": images, "profile": prof, "pipeline": type(pipe).__name__}


if __name__ == "__main__":
    main(sys.argv[1:])
