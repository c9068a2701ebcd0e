"""Tiny, randomly initialised FLUX components, every config written out in code.

The shapes keep FLUX's *layout* (16 latent channels, an 8x VAE, 2x2 packing, so a 64-channel
transformer input and a 384-channel Fill input, guidance embedding, RoPE over three axes) while
every width and depth is shrunk, so code that reasons about the real model (token counts, block
lists, channel arithmetic) sees the same structure at a tiny cost.

Each component is seeded from ``(seed, component name)`` alone, so the same component has the same
weights whichever pipeline kind it is built for, and in whatever order components are built.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.models.controlnets.controlnet_flux import FluxControlNetModel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from vramkit.testing._tokenizers import CLIP_MAX_LENGTH, clip_tokenizer, t5_tokenizer

__all__ = [
    "TINY_IMAGE_SIZE",
    "seeded",
    "tiny_controlnet",
    "tiny_scheduler",
    "tiny_text_encoders",
    "tiny_transformer",
    "tiny_vae",
]

#: Height and width (pixels) the tiny pipelines are meant to run at; also the VAE's ``sample_size``.
TINY_IMAGE_SIZE = 32

_LATENT_CHANNELS = 16  # as FLUX.1; the transformer sees 16 * 2 * 2 = 64 packed channels
_VAE_BLOCK_CHANNELS = (8, 8, 16, 16)  # four levels: a VAE scale factor of 8, as FLUX.1
_VAE_SCALE_FACTOR = 2 ** (len(_VAE_BLOCK_CHANNELS) - 1)
_PACKED_CHANNELS = _LATENT_CHANNELS * 4
# Fill conditions on the packed masked-image latents plus the mask, unshuffled from 8x8 pixels per
# latent pixel and then packed 2x2: 64 + 64 + 256 = 384, exactly as FLUX.1-Fill.
_FILL_IN_CHANNELS = _PACKED_CHANNELS * 2 + _VAE_SCALE_FACTOR**2 * 4

_TEXT_WIDTH = 32  # T5 d_model = joint_attention_dim; CLIP hidden_size = pooled_projection_dim
_HEADS = 2
_HEAD_DIM = 16
_ROPE_AXES = (4, 6, 6)  # must sum to the head dim; each axis even

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


@contextmanager
def seeded(seed: int, name: str) -> Iterator[None]:
    """Build inside this block: CPU RNG seeded from ``(seed, name)``, CPU device, float32 default.

    Only the CPU generator is seeded and forked: ``torch.manual_seed`` would also reseed every CUDA
    generator, which ``fork_rng(devices=[])`` would then not restore. Every tiny component is built
    on the CPU, so the CPU generator is the only one its initialisers draw from.

    The device and default dtype are pinned because a caller may be inside ``with
    torch.device("cuda")`` or under ``torch.set_default_dtype(torch.bfloat16)`` (the recipe for
    building full-size models fast), and the tiny models must come out the same regardless. Building
    them in float32 from the start also avoids casting with ``.to(dtype)``, which makes diffusers
    log a warning about modules to keep in float32 on every call.
    """
    # crc32, not hash(): it is stable across processes (hash() of a str is salted per process).
    derived = zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFF_FFFF
    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(derived)
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(previous_dtype)


def _ready(module: ModuleT) -> ModuleT:
    """Switch to eval mode: a module built from a config starts in train mode (dropout active)."""
    return module.eval()


def tiny_transformer(seed: int, *, fill: bool = False) -> FluxTransformer2DModel:
    """A FLUX.1-dev shaped transformer (guidance embedding on) with 2 double and 4 single blocks.

    ``fill=True`` gives the FLUX.1-Fill variant: 384 input channels, 64 output channels.
    """
    name = "transformer-fill" if fill else "transformer"
    with seeded(seed, name):
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=_FILL_IN_CHANNELS if fill else _PACKED_CHANNELS,
            out_channels=_PACKED_CHANNELS,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=_HEAD_DIM,
            num_attention_heads=_HEADS,
            joint_attention_dim=_TEXT_WIDTH,
            pooled_projection_dim=_TEXT_WIDTH,
            guidance_embeds=True,
            axes_dims_rope=_ROPE_AXES,
        )
    return _ready(model)


def tiny_controlnet(seed: int, name: str = "controlnet", *, num_mode: int | None = None) -> FluxControlNetModel:
    """An InstantX-style FLUX ControlNet (no input hint block) with 1 double and 2 single blocks.

    ``num_mode`` makes it a ControlNet-Union, which must then be called with ``control_mode``.
    """
    with seeded(seed, name), warnings.catch_warnings():
        # diffusers' own controlnet module still imports FluxPosEmbed from its deprecated location;
        # the FutureWarning is about diffusers internals, not about anything a caller can change.
        warnings.filterwarnings("ignore", message=".*FluxPosEmbed.*", category=FutureWarning)
        model = FluxControlNetModel(
            patch_size=1,
            in_channels=_PACKED_CHANNELS,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=_HEAD_DIM,
            num_attention_heads=_HEADS,
            joint_attention_dim=_TEXT_WIDTH,
            pooled_projection_dim=_TEXT_WIDTH,
            # The pipeline feeds the transformer the guidance computed from the ControlNet's config,
            # so this must match the transformer's ``guidance_embeds``.
            guidance_embeds=True,
            axes_dims_rope=_ROPE_AXES,
            num_mode=num_mode,
        )
        _unzero_controlnet(model)
    return _ready(model)


def _unzero_controlnet(model: FluxControlNetModel) -> None:
    """Give the zero-initialised output projections random weights.

    diffusers zero-initialises the ControlNet's input embedder and per-block output projections (so
    a fresh ControlNet starts as a no-op, as in training). A test bed built that way could not tell
    whether the ControlNet ran at all, or ran correctly, so its contribution is made non-zero.
    """
    projections = [model.controlnet_x_embedder, *model.controlnet_blocks, *model.controlnet_single_blocks]
    for layer in projections:
        layer.reset_parameters()


def tiny_vae(seed: int) -> AutoencoderKL:
    """A four-level ``AutoencoderKL`` with 16 latent channels, no quant convs, FLUX's latent scaling."""
    with seeded(seed, "vae"):
        model = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(_VAE_BLOCK_CHANNELS),
            up_block_types=("UpDecoderBlock2D",) * len(_VAE_BLOCK_CHANNELS),
            block_out_channels=_VAE_BLOCK_CHANNELS,
            layers_per_block=1,
            latent_channels=_LATENT_CHANNELS,
            norm_num_groups=4,
            # Tiling takes its tile size from sample_size; match the tiny image size.
            sample_size=TINY_IMAGE_SIZE,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    return _ready(model)


def tiny_text_encoders(seed: int) -> dict[str, Any]:
    """CLIP and T5 encoders with their offline tokenizers, keyed by FluxPipeline component name."""
    tokenizer = clip_tokenizer()
    tokenizer_2 = t5_tokenizer()
    with seeded(seed, "text_encoder"):
        clip = CLIPTextModel(_clip_config(tokenizer))
    with seeded(seed, "text_encoder_2"):
        t5 = T5EncoderModel(_t5_config(tokenizer_2))
    return {
        "text_encoder": _ready(clip),
        "tokenizer": tokenizer,
        "text_encoder_2": _ready(t5),
        "tokenizer_2": tokenizer_2,
    }


def _clip_config(tokenizer: PreTrainedTokenizerFast) -> CLIPTextConfig:
    """A 2-layer CLIP-L shaped text config sized to the tokenizer.

    The special-token ids must be the tokenizer's: CLIPTextModel pools at the first ``eos_token_id``.
    """
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=37,
        projection_dim=_TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_config(tokenizer: PreTrainedTokenizerFast) -> T5Config:
    """A 2-layer T5 v1.1 shaped encoder config (gated GELU) sized to the tokenizer, without dropout."""
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=_TEXT_WIDTH,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        # The default 0.1 would make two identical calls differ if anything left eval mode.
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def tiny_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config (dynamic shifting on); it has no weights, so no seed."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
