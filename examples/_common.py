"""Shared by the examples: a tiny offline pipeline by default, your local weights with --full."""

from __future__ import annotations

import argparse
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the examples never download anything


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", metavar="MODEL_DIR", help="a local diffusers folder with real weights (no download)")
    parser.add_argument("--vram", default=None, help="budget, e.g. 8GiB (default: what is free on the GPU)")
    parser.add_argument("--size", type=int, default=None, help="height and width (default: 32 tiny, 1024 full)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--quality", choices=("auto", "lossless"), default="auto")
    parser.add_argument("--prompt", default=None, help="prompt (default: the tiny pipeline's)")
    parser.add_argument("--seed", type=int, default=0)


def load(kind: str, args: argparse.Namespace, pipeline_class: Any | None = None, **extra: Any) -> tuple[Any, dict]:
    """``(pipe, call kwargs)``: the tiny pipeline of ``kind``, or ``pipeline_class`` from ``--full``."""
    import torch

    from vramkit.testing import tiny_call_kwargs, tiny_pipeline

    if not args.full:
        kwargs = tiny_call_kwargs(kind, seed=args.seed)
        if args.steps:
            kwargs["num_inference_steps"] = args.steps
        if args.size:
            kwargs["height"] = kwargs["width"] = args.size
        if args.prompt:
            kwargs["prompt"] = args.prompt
        # Real FLUX is loaded in bf16: the tiny pipeline is cast the same way.
        return tiny_pipeline(kind, seed=args.seed).to(torch.bfloat16), kwargs
    pipe = pipeline_class.from_pretrained(args.full, torch_dtype=torch.bfloat16, local_files_only=True, **extra)
    kwargs = tiny_call_kwargs(kind, seed=args.seed)  # the kind's arguments; images are replaced by the examples
    kwargs.update(height=args.size or 1024, width=args.size or 1024, num_inference_steps=args.steps or 28,
                  max_sequence_length=512, output_type="pil", prompt=args.prompt or "a red fox in the snow")
    return pipe, kwargs
