"""The full-size FLUX family architectures, built from their exact configs without weights.

``build_architecture("flux-dev")`` gives a :class:`diffusers.FluxTransformer2DModel` on the meta
device (no memory at all, well under a second) with exactly the parameters of the released model;
the planner and the CLI read sizes from these. ``device="cuda"`` builds random-weight models for
benchmarks. No tokenizer, config or weight is downloaded.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidRequestError

__all__ = [
    "ARCHITECTURES",
    "MODEL_NAMES",
    "PipelineModel",
    "PIPELINE_MODELS",
    "build_architecture",
    "architecture_config",
]

_FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

#: Exact configs (from shared/flux-facts.md and the released model configs), by architecture name.
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "flux-dev": ("flux-transformer", dict(_FLUX_TRANSFORMER)),
    "flux-schnell": ("flux-transformer", {**_FLUX_TRANSFORMER, "guidance_embeds": False}),
    "flux-fill": ("flux-transformer", {**_FLUX_TRANSFORMER, "in_channels": 384, "out_channels": 64}),
    "flux-kontext": ("flux-transformer", dict(_FLUX_TRANSFORMER)),
    "controlnet-union": (
        "flux-controlnet",
        {**_FLUX_TRANSFORMER, "num_layers": 5, "num_single_layers": 10, "num_mode": 10},
    ),
    "t5-xxl": (
        "t5",
        {
            "d_model": 4096,
            "d_kv": 64,
            "d_ff": 10240,
            "num_layers": 24,
            "num_heads": 64,
            "feed_forward_proj": "gated-gelu",
            "vocab_size": 32128,
            "dropout_rate": 0.0,
            "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128,
        },
    ),
    "clip-l": (
        "clip",
        {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
    ),
    "vae": (
        "vae",
        {
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 16,
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2,
            "act_fn": "silu",
            "norm_num_groups": 32,
            "scaling_factor": 0.3611,
            "shift_factor": 0.1159,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "sample_size": 1024,
        },
    ),
}

#: Every name :func:`build_architecture` accepts.
MODEL_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)


@dataclass(frozen=True)
class PipelineModel:
    """A whole pipeline the CLI can plan for: its components (pipeline attribute -> architecture
    name) and the call defaults that matter for memory and time."""

    name: str
    kind: str  # "flux", "fill", "kontext" or "controlnet"
    components: tuple[tuple[str, str], ...]
    max_sequence_length: int
    num_inference_steps: int
    description: str

    def component_names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.components)


_TEXT = (("text_encoder", "clip-l"), ("text_encoder_2", "t5-xxl"))

#: The full pipelines of the CLI's ``--model``.
PIPELINE_MODELS: dict[str, PipelineModel] = {
    "flux-dev": PipelineModel(
        "flux-dev", "flux", _TEXT + (("transformer", "flux-dev"), ("vae", "vae")), 512, 28, "FLUX.1-dev text-to-image"
    ),
    "flux-schnell": PipelineModel(
        "flux-schnell",
        "flux",
        _TEXT + (("transformer", "flux-schnell"), ("vae", "vae")),
        256,
        4,
        "FLUX.1-schnell text-to-image",
    ),
    "flux-fill": PipelineModel(
        "flux-fill",
        "fill",
        _TEXT + (("transformer", "flux-fill"), ("vae", "vae")),
        512,
        50,
        "FLUX.1-Fill-dev inpainting",
    ),
    "flux-kontext": PipelineModel(
        "flux-kontext",
        "kontext",
        _TEXT + (("transformer", "flux-kontext"), ("vae", "vae")),
        512,
        28,
        "FLUX.1-Kontext-dev image editing",
    ),
    "flux-dev+controlnet-union": PipelineModel(
        "flux-dev+controlnet-union",
        "controlnet",
        _TEXT + (("transformer", "flux-dev"), ("controlnet", "controlnet-union"), ("vae", "vae")),
        512,
        28,
        "FLUX.1-dev with a ControlNet Union (InstantX style)",
    ),
}


def architecture_config(name: str) -> tuple[str, dict[str, Any]]:
    """``(family, config kwargs)`` of an architecture name."""
    try:
        family, config = ARCHITECTURES[name]
    except KeyError:
        raise InvalidRequestError(f"unknown architecture {name!r}; known: {', '.join(MODEL_NAMES)}.") from None
    return family, dict(config)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _construct(family: str, config: dict[str, Any]) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if family == "flux-transformer":
            from diffusers import FluxTransformer2DModel

            return FluxTransformer2DModel(**config)
        if family == "flux-controlnet":
            from diffusers import FluxControlNetModel

            return FluxControlNetModel(**config)
        if family == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL(**config)
        if family == "t5":
            from transformers import T5Config, T5EncoderModel

            model = T5EncoderModel(T5Config(**config))
            model.tie_weights()  # shared and encoder.embed_tokens are one tensor in the checkpoint
            return model
        if family == "clip":
            from transformers import CLIPTextConfig, CLIPTextModel

            return CLIPTextModel(CLIPTextConfig(**config))
    raise InvalidRequestError(f"unknown architecture family {family!r}")  # pragma: no cover


def build_architecture(
    name: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16
) -> torch.nn.Module:
    """Build the full-size architecture ``name`` (one of :data:`MODEL_NAMES`) in ``dtype``.

    On ``"meta"`` (the default) no memory is allocated and nothing is initialized: only shapes and
    dtypes exist, which is all the planner needs. On another device the weights are random (the
    module's own initialization, done on that device): for benchmarks. The model is in eval mode.
    """
    family, config = architecture_config(name)
    device = torch.device(device)
    with _default_dtype(dtype):
        if device.type == "meta":
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=True):
                model = _construct(family, config)
        else:
            with device:
                model = _construct(family, config)
    if any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        model = model.to(dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model
