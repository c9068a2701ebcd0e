"""Tiny models and checks shared by the block streaming engine's tests (built here, offline)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.controlnets.controlnet_flux import FluxControlNetModel
from transformers import T5Config, T5EncoderModel

TINY_FLUX = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=False,
    axes_dims_rope=(2, 2, 4),
)


def build_flux(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> FluxTransformer2DModel:
    cfg = {**TINY_FLUX, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**cfg)
    return model.to(dtype).eval().requires_grad_(False)


def flux_inputs(dtype: torch.dtype = torch.float32, seed: int = 1, guidance: bool = False) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    out = dict(
        hidden_states=torch.randn(1, 16, 16, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g).to(dtype),
        pooled_projections=torch.randn(1, 32, generator=g).to(dtype),
        timestep=torch.tensor([0.5], dtype=dtype),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
        .reshape(-1, 3)
        .to(dtype),
        txt_ids=torch.zeros(8, 3, dtype=dtype),
        return_dict=False,
    )
    if guidance:
        out["guidance"] = torch.tensor([3.5], dtype=dtype)
    return out


def build_controlnet(seed: int = 0) -> FluxControlNetModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxControlNetModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=False,
            axes_dims_rope=(2, 2, 4),
        )
    # ControlNet blocks are zero-initialised; randomise them so the outputs carry information.
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model.eval().requires_grad_(False)


def build_t5(seed: int = 0, num_layers: int = 4) -> T5EncoderModel:
    cfg = T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=num_layers,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(cfg)
    return model.eval().requires_grad_(False)


def snapshot(module: torch.nn.Module) -> dict[str, tuple[int, torch.device, torch.Tensor]]:
    """Every parameter and buffer: (object id for parameters, device, a copy of the values)."""
    out: dict[str, tuple[int, torch.device, torch.Tensor]] = {}
    for name, p in module.named_parameters():
        out[name] = (id(p), p.device, p.detach().clone())
    for name, b in module.named_buffers():
        out["buffer:" + name] = (0, b.device, b.detach().clone())
    return out


def assert_same_as(module: torch.nn.Module, snap: dict[str, tuple[int, torch.device, torch.Tensor]]) -> None:
    now = snapshot(module)
    assert now.keys() == snap.keys()
    for name, (pid, device, value) in snap.items():
        npid, ndevice, nvalue = now[name]
        assert npid == pid, f"{name}: parameter object replaced"
        assert ndevice == device, f"{name}: device {ndevice} != {device}"
        assert nvalue.dtype == value.dtype and nvalue.shape == value.shape, name
        assert torch.equal(nvalue, value), f"{name}: values changed"


def assert_no_hooks(module: torch.nn.Module) -> None:
    for name, sub in module.named_modules():
        registry = getattr(sub, "_diffusers_hook", None)
        assert registry is None or not registry.hooks, f"{name or 'root'} still has hooks {list(registry.hooks)}"
        assert "forward" not in sub.__dict__, f"{name or 'root'}.forward is still wrapped"
        assert "_vramkit_streamer" not in sub.__dict__
