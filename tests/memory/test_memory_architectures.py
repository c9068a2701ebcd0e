"""The full-size architectures: exact configs, exact parameter counts, no memory used."""

from __future__ import annotations

import pytest
import torch

from vramkit.errors import InvalidRequestError
from vramkit.memory.architectures import MODEL_NAMES, PIPELINE_MODELS, build_architecture
from vramkit.memory.estimator import component_sizes

# Exact parameter counts of the released checkpoints (tied T5 embeddings counted once).
EXACT_PARAMS = {
    "flux-dev": 11_901_408_320,
    "flux-schnell": 11_891_178_560,
    "flux-fill": 11_902_391_360,
    "flux-kontext": 11_901_408_320,
    "controlnet-union": 3_301_956_608,
    "t5-xxl": 4_762_310_656,
    "clip-l": 123_060_480,
    "vae": 83_819_683,
}
BLOCKS = {
    "flux-dev": 57,
    "flux-schnell": 57,
    "flux-fill": 57,
    "flux-kontext": 57,
    "controlnet-union": 15,
    "t5-xxl": 24,
    "clip-l": 12,
    "vae": 0,
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_exact_sizes_on_meta(name):
    model = build_architecture(name)
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert not model.training
    sizes = component_sizes(name, model)
    assert sizes.params == EXACT_PARAMS[name]
    assert sizes.num_blocks == BLOCKS[name]
    assert sizes.weight_bytes("loaded") == sizes.weight_bytes("bf16")
    assert sizes.weight_bytes("loaded") >= 2 * EXACT_PARAMS[name]


def test_flux_blocks_and_rest_match_the_facts():
    sizes = component_sizes("transformer", build_architecture("flux-dev"))
    blocks = sizes.block_bytes()
    assert blocks[:19] == (2 * 339_831_296,) * 19
    assert blocks[19:] == (2 * 141_591_808,) * 38
    assert sizes.rest_bytes() == 2 * 64_124_992
    assert sizes.weight_bytes() == 23_802_816_640  # 23.8 GB, flux-facts.md
    assert (sizes.hidden, sizes.heads, sizes.layers) == (3072, 24, 57)


def test_other_dtypes():
    model = build_architecture("vae", dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.get_default_dtype() == torch.float32  # restored


def test_unknown_name():
    with pytest.raises(InvalidRequestError, match="flux-dev"):
        build_architecture("flux-pro")


def test_pipeline_models_cover_the_cli_models():
    assert set(PIPELINE_MODELS) == {
        "flux-dev",
        "flux-schnell",
        "flux-fill",
        "flux-kontext",
        "flux-dev+controlnet-union",
    }
    for pm in PIPELINE_MODELS.values():
        names = pm.component_names()
        assert {"transformer", "vae", "text_encoder", "text_encoder_2"} <= set(names)
        assert all(arch in MODEL_NAMES for _, arch in pm.components)
    assert PIPELINE_MODELS["flux-schnell"].max_sequence_length == 256
    assert "controlnet" in PIPELINE_MODELS["flux-dev+controlnet-union"].component_names()
