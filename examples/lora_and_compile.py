"""A LoRA on an optimized pipeline, and (with --compile) regional torch.compile of the blocks.

    python examples/lora_and_compile.py                  # tiny pipeline, a tiny random LoRA
    python examples/lora_and_compile.py --compile        # also compile the repeated blocks
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import add_common_arguments, load


def tiny_lora(pipe: Any, rank: int = 4, seed: int = 0) -> dict[str, Any]:
    """A random LoRA for the tiny transformer, in the layout diffusers' load_lora_weights accepts."""
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    state: dict[str, Any] = {}
    for name, module in pipe.transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v")) and isinstance(module, torch.nn.Linear):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.1
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.1
    return state


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    import vramkit
    from vramkit.strategies import AttentionSlicing, Compile, PromptCache

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the repeated blocks")
    parser.add_argument("--lora", help="a LoRA .safetensors file (default: a tiny random one)")
    args = parser.parse_args(argv)
    from diffusers import FluxPipeline

    pipe, kwargs = load("flux", args, FluxPipeline)
    strategies: list[Any] = [AttentionSlicing(chunk=1024), PromptCache()]
    if args.compile:
        strategies.append(Compile(backend="inductor" if torch.cuda.is_available() else "aot_eager"))
    plan = vramkit.optimize(pipe, strategies=strategies)
    print(plan.explain())
    pipe.load_lora_weights(args.lora or tiny_lora(pipe), adapter_name="style")
    with_lora = pipe(**kwargs).images
    pipe.set_adapters(["style"], adapter_weights=[0.0])
    without = pipe(**kwargs).images
    vramkit.restore(pipe)
    print("LoRA changes the image:", not torch.equal(with_lora, without) if isinstance(with_lora, torch.Tensor) else "")
    return {"plan": plan, "with_lora": with_lora, "without_lora": without}


if __name__ == "__main__":
    main(sys.argv[1:])
