"""Full-size architectures on the meta device have the exact sizes of the real models."""

from __future__ import annotations

import pytest
import torch

from vramkit.testing.full_size import FULL_SIZE_NAMES, full_size_architecture, full_size_pipeline

# Parameter counts (billions) from ../shared/flux-facts.md, to the stated precision.
EXPECTED_BILLIONS = {
    "flux-dev": 11.90,
    "flux-schnell": 11.90,
    "flux-fill": 11.90,
    "flux-kontext": 11.90,
    "t5-xxl": 4.76,
    "clip-l": 0.123,
    "vae": 0.0838,
    "controlnet-union": 3.30,
}


@pytest.mark.parametrize("name", FULL_SIZE_NAMES)
def test_meta_architecture_sizes(name):
    model = full_size_architecture(name)
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    billions = sum(p.numel() for p in params) / 1e9
    assert billions == pytest.approx(EXPECTED_BILLIONS[name], rel=0.01)
    assert all(p.dtype == torch.bfloat16 for p in params)


def test_flux_dev_block_sizes_match_the_facts():
    model = full_size_architecture("flux-dev")
    double = sum(p.numel() for p in model.transformer_blocks[0].parameters())
    single = sum(p.numel() for p in model.single_transformer_blocks[0].parameters())
    assert len(model.transformer_blocks) == 19 and len(model.single_transformer_blocks) == 38
    assert double / 1e6 == pytest.approx(339.8, rel=0.002)
    assert single / 1e6 == pytest.approx(141.6, rel=0.002)
    assert model.config.guidance_embeds
    assert not full_size_architecture("flux-schnell").config.guidance_embeds
    assert full_size_architecture("flux-fill").config.in_channels == 384


def test_materialized_small_component_has_random_weights_on_cpu():
    vae = full_size_architecture("vae", materialize=True, device="cpu", dtype=torch.float32)
    weights = next(p for p in vae.parameters() if p.dim() == 4)
    assert weights.device.type == "cpu" and weights.dtype == torch.float32
    assert weights.float().std() > 0


def test_full_size_pipeline_components():
    comps = full_size_pipeline("flux-dev+controlnet-union")
    assert set(comps) == {"text_encoder", "text_encoder_2", "transformer", "controlnet", "vae"}
