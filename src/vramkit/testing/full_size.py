"""Full-size FLUX-family architectures for planning (meta device) and GPU benchmarks (random weights)."""

from __future__ import annotations

from typing import Any

import torch

from ..memory.architectures import MODEL_NAMES, PIPELINE_MODELS, build_architecture

__all__ = ["full_size_architecture", "full_size_pipeline", "full_size_flux_pipeline", "FULL_SIZE_NAMES"]

#: Names :func:`full_size_architecture` accepts.
FULL_SIZE_NAMES: tuple[str, ...] = MODEL_NAMES


def full_size_architecture(
    name: str,
    *,
    materialize: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.nn.Module:
    """The full-size architecture ``name`` ("flux-dev", "flux-schnell", "flux-fill", "flux-kontext",
    "controlnet-union", "t5-xxl", "clip-l", "vae").

    By default on the meta device: exact shapes and sizes, no memory. With ``materialize=True`` the
    weights are random, created directly on ``device`` (default: CUDA if available, else CPU) in
    ``dtype``: the memory and speed of the real model, for benchmarks.
    """
    if not materialize:
        return build_architecture(name, device="meta", dtype=dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_architecture(name, device=device, dtype=dtype)


def full_size_pipeline(model: str = "flux-dev", *, device: str | torch.device = "meta",
                       dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The model components of a full pipeline (``--model`` names of ``vramkit plan``) by attribute
    name, each from :func:`full_size_architecture`. Tokenizers and scheduler are not included."""
    spec = PIPELINE_MODELS[model]
    materialize = torch.device(device).type != "meta"
    return {
        attr: full_size_architecture(arch, materialize=materialize, device=device, dtype=dtype)
        for attr, arch in spec.components
    }


def _flux_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's scheduler config (written out: nothing is read from the hub).
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def full_size_flux_pipeline(
    model: str = "flux-dev", *, device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16
) -> Any:
    """A whole diffusers pipeline of the full-size architectures (``model`` as in ``vramkit plan
    --model``) with offline tokenizers and FLUX.1-dev's scheduler config. On ``"meta"`` it has exact
    sizes and no memory (for planning); on a device, random weights (for GPU benchmarks)."""
    from diffusers import FluxControlNetPipeline, FluxFillPipeline, FluxKontextPipeline, FluxPipeline

    from ._tokenizers import clip_tokenizer, t5_tokenizer

    spec = PIPELINE_MODELS[model]
    comps = full_size_pipeline(model, device=device, dtype=dtype)
    cls = {
        "flux": FluxPipeline,
        "fill": FluxFillPipeline,
        "kontext": FluxKontextPipeline,
        "controlnet": FluxControlNetPipeline,
    }[spec.kind]
    return cls(scheduler=_flux_scheduler(), tokenizer=clip_tokenizer(), tokenizer_2=t5_tokenizer(), **comps)
