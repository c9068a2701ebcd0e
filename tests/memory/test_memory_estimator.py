"""Exact weight bytes per storage format, and the activation/time model against flux-facts.md."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vramkit.memory.architectures import build_architecture
from vramkit.memory.calibration import Calibration
from vramkit.memory.estimator import (
    ParamStats,
    component_sizes,
    compute_factor,
    image_tokens,
    t5_activation_bytes,
    transformer_activation_bytes,
    transformer_compute_seconds,
    vae_decode_bytes,
    vae_decode_seconds,
    vae_tiles,
)

CAL = Calibration()


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.Module()
        self.norm1.linear = nn.Linear(8, 16)  # adaLN modulation: stays in fp8 storage, quantized in int8
        self.to_q = nn.Linear(8, 8, bias=False)
        self.ln = nn.LayerNorm(8)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x_embedder = nn.Linear(4, 8)
        self.transformer_blocks = nn.ModuleList([_Block(), _Block()])
        self.single_transformer_blocks = nn.ModuleList()
        self.proj_out = nn.Linear(8, 4)
        self.register_buffer("ids", torch.zeros(10, dtype=torch.int64))


def test_formats_count_exactly():
    model = _Model().to(torch.bfloat16)
    sizes = component_sizes("other", model)
    # Unknown class: no block stacks recognised, everything is "the rest".
    assert sizes.num_blocks == 0
    n = sum(p.numel() for p in model.parameters())
    assert sizes.params == n
    assert sizes.weight_bytes("loaded") == 2 * n + 80
    assert sizes.weight_bytes("bf16") == 2 * n + 80
    # fp8 (diffusers' layerwise casting rules): Linear/Conv weight+bias to 1 byte unless the name
    # matches norm / ^proj_out$ ...: x_embedder and to_q (2 blocks) are cast; norm1.linear and proj_out stay.
    fp8 = (4 * 8 + 8) + 2 * 64
    assert sizes.weight_bytes("fp8") == fp8 + 2 * (n - fp8) + 80
    # int8: every Linear weight 1 byte + one bf16 scale per output row; biases and norms stay.
    lin = 4 * 8 + 2 * (8 * 16 + 8 * 8) + 8 * 4
    rows = 8 + 2 * (16 + 8) + 4
    assert sizes.weight_bytes("int8") == lin + 2 * rows + 2 * (n - lin) + 80
    # nf4: half a byte per Linear weight plus a 4-byte absmax per 64 weights (per tensor, rounded up).
    blocks64 = 1 + 2 * (2 + 1) + 1
    assert sizes.weight_bytes("nf4") == (lin + 1) // 2 + 4 * blocks64 + 2 * (n - lin) + 80
    with pytest.raises(ValueError):
        sizes.weight_bytes("fp4")


def test_param_stats_add():
    a = ParamStats(float_numel=2, float_bytes=4, lin_numel=1, lin_loaded_bytes=2, lin_rows=1)
    b = ParamStats(float_numel=3, float_bytes=6, other_bytes=8)
    c = a + b
    assert c.bytes("loaded") == 18 and c.float_numel == 5 and c.lin_rows == 1


def test_flux_storage_formats():
    sizes = component_sizes("transformer", build_architecture("flux-dev"))
    loaded, fp8, int8, nf4 = (sizes.weight_bytes(f) for f in ("loaded", "fp8", "int8", "nf4"))
    assert loaded == 23_802_816_640
    # fp8 layerwise keeps the adaLN linears (under norm*) in bf16: about 15.1 GB, matching the 15.7 GB
    # peak flux-facts measured for enable_layerwise_casting with activations on top.
    assert 14.9e9 < fp8 < 15.4e9
    assert 11.8e9 < int8 < 12.0e9
    assert 6.5e9 < nf4 < 6.9e9
    assert fp8 < loaded and int8 < fp8 and nf4 < int8


def test_t5_tied_embeddings_counted_once():
    sizes = component_sizes("text_encoder_2", build_architecture("t5-xxl"))
    assert sizes.weight_bytes() == 9_524_621_312  # 9.5 GB
    assert sizes.rest_bytes() == 2 * (32128 * 4096 + 4096)  # one embedding + the final norm


def test_transformer_time_matches_facts():
    sizes = component_sizes("transformer", build_architecture("flux-dev"))
    t1024 = transformer_compute_seconds(CAL, sizes, 1, image_tokens(1024, 1024) + 512)
    t512 = transformer_compute_seconds(CAL, sizes, 1, image_tokens(512, 512) + 512)
    assert t1024 == pytest.approx(0.179, rel=0.01)
    assert t512 == pytest.approx(0.065, rel=0.01)
    assert transformer_compute_seconds(CAL, sizes, 2, 4608) > 1.9 * t1024 - CAL.step_overhead_s
    assert compute_factor(CAL, "fp8") == pytest.approx(0.208 / 0.179, rel=0.03)  # facts 1.16, H200 run 1.18
    assert compute_factor(CAL, "loaded", streamed=True, loaded_dtype="bf16") == 1.0


def test_transformer_activations():
    sizes = component_sizes("transformer", build_architecture("flux-dev"))
    act = transformer_activation_bytes(CAL, sizes, 1, 4608, materialized_scores=False)
    assert act == pytest.approx(0.5e9, rel=0.01)  # 24.3 GB peak - 23.8 GB weights
    assert transformer_activation_bytes(CAL, sizes, 2, 4608, materialized_scores=False) == pytest.approx(
        2 * act, rel=1e-6
    )
    full = transformer_activation_bytes(CAL, sizes, 1, 4608, materialized_scores=True)
    chunked = transformer_activation_bytes(CAL, sizes, 1, 4608, materialized_scores=True, chunk=1024)
    assert act < chunked < full


def test_t5_activations_match_facts():
    sizes = component_sizes("text_encoder_2", build_architecture("t5-xxl"))
    peak = sizes.weight_bytes() + t5_activation_bytes(CAL, sizes, 512)
    assert peak == pytest.approx(9.8e9, rel=0.02)
    assert t5_activation_bytes(CAL, sizes, 256) < t5_activation_bytes(CAL, sizes, 512)


def test_vae_decode_matches_facts():
    sizes = component_sizes("vae", build_architecture("vae"))
    w = sizes.weight_bytes()
    assert w + vae_decode_bytes(CAL, sizes, 1024, 1024, 1) == pytest.approx(2.76e9, rel=0.02)
    assert w + vae_decode_bytes(CAL, sizes, 2048, 2048, 1) == pytest.approx(10.4e9, rel=0.03)
    assert vae_decode_seconds(CAL, 1024, 1024, 1) == pytest.approx(0.086, rel=0.01)
    assert vae_decode_seconds(CAL, 2048, 2048, 1) == pytest.approx(0.39, rel=0.03)
    plain4 = vae_decode_bytes(CAL, sizes, 1024, 1024, 4)
    sliced4 = vae_decode_bytes(CAL, sizes, 1024, 1024, 4, slicing=True)
    tiled = vae_decode_bytes(CAL, sizes, 2048, 2048, 1, tile=512)
    assert sliced4 < plain4 / 3
    assert tiled < vae_decode_bytes(CAL, sizes, 2048, 2048, 1) / 8
    # A tile as large as the image does not tile.
    assert vae_decode_bytes(CAL, sizes, 512, 512, 1, tile=512) == vae_decode_bytes(CAL, sizes, 512, 512, 1)
    assert vae_tiles(1024, 1024, 512) == 9
    assert vae_decode_seconds(CAL, 2048, 2048, 1, tile=512) > vae_decode_seconds(CAL, 2048, 2048, 1)


def test_image_tokens():
    assert image_tokens(1024, 1024) == 4096
    assert image_tokens(768, 1360) == 48 * 85
