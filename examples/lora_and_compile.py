"""A LoRA on an optimized pipeline, and (only with --compile) regional torch.compile of the blocks.

    python examples/lora_and_compile.py                          # tiny pipeline, a tiny LoRA made with peft
    python examples/lora_and_compile.py --compile                # also compile the repeated blocks
    python examples/lora_and_compile.py --full /models/FLUX.1-dev --lora style.safetensors --vram 12GiB --compile

The LoRA goes through ``vramkit.lora``, whose helpers take the plan's offloading/streaming steps off
while diffusers changes the layers and put them back (diffusers' own ``load_lora_weights`` would
replace vramkit's hooks with its own offloading). Without ``--lora``, a LoRA is made the way a
trainer makes one: peft's ``LoraConfig`` injected into a copy of the transformer, exported with
``get_peft_model_state_dict`` and saved as ``.safetensors``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import add_common_arguments, load

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora_file(transformer: Any, path: Path, rank: int = 4, seed: int = 0) -> Path:
    """Save a random LoRA for ``transformer`` (made with peft) to ``path``; return the path."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    model = copy.deepcopy(transformer).float()
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS), model, adapter_name="x")
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in sorted(get_peft_model_state_dict(model, adapter_name="x").items()):
        # peft starts lora_B at zero (no effect): draw both from a seeded generator instead.
        scale = 2.0 if "lora_B" in key else value.shape[1] ** -0.5
        state[f"transformer.{key}"] = (torch.randn(value.shape, generator=g) * scale).contiguous()
    save_file(state, str(path))
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    import vramkit
    from vramkit.strategies import Compile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the repeated blocks (Compile strategy)")
    parser.add_argument("--lora", help="a LoRA .safetensors file (default: a tiny one made with peft)")
    parser.add_argument("--lora-scale", type=float, default=0.8)
    args = parser.parse_args(argv)
    from diffusers import FluxPipeline

    pipe, kwargs = load("flux", args, FluxPipeline)
    vram = args.vram or (None if torch.cuda.is_available() else "8GiB")
    plan = vramkit.optimize(pipe, vram=vram, height=kwargs["height"], width=kwargs["width"], quality=args.quality)
    print(plan.explain())

    with tempfile.TemporaryDirectory() as tmp:
        lora = args.lora or make_lora_file(pipe.transformer, Path(tmp) / "tiny_lora.safetensors")
        vramkit.lora.load_lora_weights(pipe, str(lora), adapter_name="style")
    vramkit.lora.set_adapters(pipe, ["style"], adapter_weights=[args.lora_scale])
    with_lora = pipe(**kwargs).images
    vramkit.lora.set_adapters(pipe, ["style"], adapter_weights=[0.0])
    without = pipe(**kwargs).images
    vramkit.lora.set_adapters(pipe, ["style"], adapter_weights=[args.lora_scale])

    compiled = None
    if args.compile:
        # After the LoRA is set: changing adapters later would recompile. On a CPU "aot_eager" traces
        # without generating C++ (quick); on a GPU "inductor" fuses kernels.
        backend = "inductor" if torch.cuda.is_available() else "aot_eager"
        vramkit.restore(pipe)
        compiled = vramkit.optimize(pipe, strategies=[*plan.strategies, Compile(backend=backend)])
        print(compiled.explain())
        pipe(**kwargs)  # the first call compiles

    def changed(a: Any, b: Any) -> bool:
        return not torch.equal(a, b) if isinstance(a, torch.Tensor) else a[0].tobytes() != b[0].tobytes()

    print("LoRA changes the image:", changed(with_lora, without))
    try:
        vramkit.restore(pipe)
    except vramkit.errors.IrreversibleError as exc:
        print("restore:", exc)
    return {"plan": plan, "compiled_plan": compiled, "with_lora": with_lora, "without_lora": without}


if __name__ == "__main__":
    main(sys.argv[1:])
