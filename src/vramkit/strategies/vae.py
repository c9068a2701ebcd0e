"""Mechanisms for ``VaeTiling`` and ``VaeSlicing`` on diffusers' AutoencoderKL."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequestError
from .base import Undo, register_strategy
from .configs import VaeSlicing, VaeTiling

_TILE_ATTRS = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")


@register_strategy(VaeTiling)
def apply_vae_tiling(pipe: Any, config: VaeTiling, component: str | None) -> Undo | None:
    vae = getattr(pipe, component)
    missing = [a for a in _TILE_ATTRS if not hasattr(vae, a)]
    if missing:
        raise InvalidRequestError(f"VaeTiling: {type(vae).__name__} is not an AutoencoderKL (no {missing}).")
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    saved = {a: getattr(vae, a) for a in _TILE_ATTRS}
    vae.tile_sample_min_size = config.tile
    vae.tile_latent_min_size = config.tile // scale
    vae.tile_overlap_factor = float(config.overlap)
    vae.use_tiling = True

    def undo() -> None:
        for a, v in saved.items():
            setattr(vae, a, v)

    return undo


@register_strategy(VaeSlicing)
def apply_vae_slicing(pipe: Any, config: VaeSlicing, component: str | None) -> Undo | None:
    vae = getattr(pipe, component)
    if not hasattr(vae, "use_slicing"):
        raise InvalidRequestError(f"VaeSlicing: {type(vae).__name__} does not support slicing.")
    before = vae.use_slicing
    vae.use_slicing = True

    def undo() -> None:
        vae.use_slicing = before

    return undo
