"""Tiny LoRAs for the tiny FLUX pipelines, and the outputs of an unoptimized pipeline carrying them.

(A helper module of tests/lora, imported by name as tests/engine does with streaming_models.)

A LoRA is made the way a trainer makes one: peft's ``LoraConfig`` injected into a copy of the
model, exported with ``get_peft_model_state_dict`` and prefixed with the pipeline component
(``transformer.`` / ``text_encoder.``), the format ``FluxLoraLoaderMixin.load_lora_weights``
takes as a dict. ``lora_B`` starts at zero in peft and ``lora_A`` comes from the global RNG, so
both are drawn again from a generator seeded per LoRA: the same LoRA on every machine and run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from vramkit.testing import tiny_pipeline
from vramkit.testing.checks import run_tiny

# Large enough that the LoRA's effect on the image (mean |diff| about 0.057) is at least twice every
# lossy strategy's mean tolerance, so "within tolerance" also proves the LoRA ran.
LORA_B_STD = 2.0
TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def make_lora(
    module: torch.nn.Module, prefix: str, targets: tuple[str, ...], seed: int, rank: int = 4
) -> dict[str, torch.Tensor]:
    """A LoRA state dict for ``module`` in diffusers/peft format, keys prefixed ``prefix.``."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(module)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), model, adapter_name="x")
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in sorted(get_peft_model_state_dict(model, adapter_name="x").items()):
        # peft draws lora_A from the global RNG: redraw both from this LoRA's own generator.
        if "lora_B" in key:
            value = torch.randn(value.shape, generator=generator) * LORA_B_STD
        else:
            value = torch.randn(value.shape, generator=generator) / value.shape[1] ** 0.5
        out[f"{prefix}.{key}"] = value
    return out


@dataclass
class LoraOutputs:
    """Outputs of the unoptimized tiny flux pipeline: without LoRA, with adapter "a" at weight 1,
    at weight 0.5, fused (weight 1), and unfused again; in that call order (unfusing is not exact)."""

    state_dict: dict[str, torch.Tensor]
    none: torch.Tensor
    lora: torch.Tensor
    half: torch.Tensor
    fused: torch.Tensor
    unfused: torch.Tensor


def reference_outputs(state_dict: dict[str, torch.Tensor]) -> LoraOutputs:
    pipe = tiny_pipeline("flux")
    run_tiny(pipe, "flux")  # warm-up
    none = run_tiny(pipe, "flux")
    pipe.load_lora_weights(state_dict, adapter_name="a")
    lora = run_tiny(pipe, "flux")
    pipe.set_adapters(["a"], adapter_weights=[0.5])
    half = run_tiny(pipe, "flux")
    pipe.set_adapters(["a"], adapter_weights=[1.0])
    pipe.fuse_lora()
    fused = run_tiny(pipe, "flux")
    pipe.unfuse_lora()
    unfused = run_tiny(pipe, "flux")
    return LoraOutputs(state_dict, none, lora, half, fused, unfused)
