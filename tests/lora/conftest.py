"""Session fixtures of the LoRA tests: the tiny LoRAs and the unoptimized pipeline's outputs."""

from __future__ import annotations

import pytest
import torch
from tiny_loras import TEXT_ENCODER_TARGETS, TRANSFORMER_TARGETS, LoraOutputs, make_lora, reference_outputs

from vramkit.testing import tiny_pipeline


@pytest.fixture(scope="session")
def transformer_lora() -> dict[str, torch.Tensor]:
    pipe = tiny_pipeline("flux")
    return make_lora(pipe.transformer, "transformer", TRANSFORMER_TARGETS, seed=1)


@pytest.fixture(scope="session")
def full_lora() -> dict[str, torch.Tensor]:
    """A LoRA on the transformer and the CLIP text encoder."""
    pipe = tiny_pipeline("flux")
    return {
        **make_lora(pipe.transformer, "transformer", TRANSFORMER_TARGETS, seed=1),
        **make_lora(pipe.text_encoder, "text_encoder", TEXT_ENCODER_TARGETS, seed=2),
    }


@pytest.fixture(scope="session")
def lora_ref(transformer_lora) -> LoraOutputs:
    return reference_outputs(transformer_lora)


@pytest.fixture(scope="session")
def full_lora_ref(full_lora) -> LoraOutputs:
    return reference_outputs(full_lora)
