"""ControlNet Union with a low VRAM budget: the ControlNet is part of the plan.

    python examples/controlnet_union_low_vram.py                          # tiny offline pipeline
    python examples/controlnet_union_low_vram.py --full /models/FLUX.1-dev \\
        --controlnet /models/FLUX.1-dev-Controlnet-Union --control-image canny.png --control-mode canny --vram 12GiB

A Union ControlNet is one model for several kinds of control, chosen per call with ``control_mode``.
vramkit plans it with the transformer: resident, block-streamed with its own resident block count, or
offloaded, and counts its residuals in every step's activations.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import add_common_arguments, load

#: InstantX FLUX.1-dev ControlNet Union modes.
CONTROL_MODES = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}


def edges_image(size: int) -> Any:
    """A synthetic white-on-black line drawing (a stand-in for a Canny edge map)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "black")
    draw = ImageDraw.Draw(image)
    s = size
    draw.ellipse((s * 0.25, s * 0.2, s * 0.75, s * 0.7), outline="white", width=max(1, s // 64))
    draw.line((s * 0.1, s * 0.85, s * 0.9, s * 0.85), fill="white", width=max(1, s // 64))
    return image


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    import vramkit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--controlnet", metavar="CN_DIR", help="local ControlNet Union folder (with --full)")
    parser.add_argument("--control-image", help="control image file (default: a synthetic edge map)")
    parser.add_argument("--control-mode", choices=sorted(CONTROL_MODES), default="canny")
    parser.add_argument("--scale", type=float, default=0.6, help="controlnet_conditioning_scale")
    args = parser.parse_args(argv)
    from diffusers import FluxControlNetModel, FluxControlNetPipeline
    from PIL import Image

    extra = {}
    if args.full:
        if not args.controlnet:
            parser.error("--full needs --controlnet CN_DIR as well (the base model and the ControlNet are separate)")
        extra["controlnet"] = FluxControlNetModel.from_pretrained(
            args.controlnet, torch_dtype=torch.bfloat16, local_files_only=True
        )
    pipe, kwargs = load("controlnet-union", args, FluxControlNetPipeline, **extra)
    size = kwargs["height"]
    control = Image.open(args.control_image).convert("RGB") if args.control_image else edges_image(size)
    kwargs.update(control_image=control, control_mode=CONTROL_MODES[args.control_mode],
                  controlnet_conditioning_scale=args.scale)

    vram = args.vram or (None if torch.cuda.is_available() else "12GiB")
    plan = vramkit.optimize(pipe, vram=vram, height=kwargs["height"], width=kwargs["width"], quality=args.quality)
    print(plan.explain())
    placed = {s.component for s in plan.steps if s.component} | {
        c for s in plan.steps for c in (getattr(s.strategy, "components", None) or ())
    }
    print("ControlNet placed by the plan:", "controlnet" in placed)
    images = pipe(**kwargs).images
    try:
        vramkit.restore(pipe)
    except vramkit.errors.IrreversibleError as exc:  # fp8/int8 storage stays: the pipeline still works
        print("restore:", exc)
    return {"plan": plan, "images": images, "control_image": control}


if __name__ == "__main__":
    main(sys.argv[1:])
