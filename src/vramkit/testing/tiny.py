"""Tiny, deterministic, fully offline FLUX pipelines for tests.

``tiny_pipeline(kind)`` builds a real diffusers FLUX pipeline (the real classes, the real code
paths) whose components are a few hundred kilobytes of random float32 weights on the CPU, and
``tiny_call_kwargs(kind)`` gives arguments that run it in well under a second. Nothing is read from
disk or the Hugging Face hub: every config is written out in code and both tokenizers are built in
memory.

Determinism: the same ``kind`` and ``seed`` always give the same weights, building never changes
the global torch RNG state, and calling a fresh pipeline with fresh call kwargs twice gives
bit-identical images.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    FluxControlNetPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
)
from diffusers.models.controlnets.controlnet_flux import FluxMultiControlNetModel
from PIL import Image

from vramkit.errors import InvalidRequestError
from vramkit.testing._components import (
    TINY_IMAGE_SIZE,
    tiny_controlnet,
    tiny_scheduler,
    tiny_text_encoders,
    tiny_transformer,
    tiny_vae,
)

__all__ = ["TINY_KINDS", "tiny_call_kwargs", "tiny_pipeline"]

logger = logging.getLogger("vramkit")

#: Every pipeline kind :func:`tiny_pipeline` and :func:`tiny_call_kwargs` accept.
TINY_KINDS: tuple[str, ...] = (
    "flux",
    "img2img",
    "inpaint",
    "fill",
    "kontext",
    "controlnet",
    "controlnet-union",
    "multi-controlnet",
)

_PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "flux": FluxPipeline,
    "img2img": FluxImg2ImgPipeline,
    "inpaint": FluxInpaintPipeline,
    "fill": FluxFillPipeline,
    "kontext": FluxKontextPipeline,
    "controlnet": FluxControlNetPipeline,
    "controlnet-union": FluxControlNetPipeline,
    "multi-controlnet": FluxControlNetPipeline,
}

_PROMPT = "a tiny red fox in the snow"
_MAX_SEQUENCE_LENGTH = 16
_UNION_NUM_MODES = 10  # as InstantX's FLUX.1-dev ControlNet-Union
_UNION_CONTROL_MODE = 2


def _check_kind(kind: str) -> str:
    """Return ``kind`` if it is one of :data:`TINY_KINDS`, else raise :class:`InvalidRequestError`."""
    if kind not in _PIPELINE_CLASSES:
        raise InvalidRequestError(f"unknown tiny pipeline kind {kind!r}; valid kinds are: {', '.join(TINY_KINDS)}")
    return kind


def tiny_pipeline(kind: str, seed: int = 0) -> DiffusionPipeline:
    """Build a tiny FLUX pipeline of the given kind on the CPU in float32, entirely in memory.

    Args:
        kind: one of :data:`TINY_KINDS`.
        seed: selects the random weights; the same ``(kind, seed)`` always gives the same weights,
            and a component shared by two kinds (the VAE, the text encoders, the transformer) has the
            same weights in both.

    Returns:
        The pipeline, every model in eval mode, with its progress bar disabled.

    Raises:
        InvalidRequestError: ``kind`` is not one of :data:`TINY_KINDS`.
    """
    pipeline_class = _PIPELINE_CLASSES[_check_kind(kind)]
    components: dict[str, Any] = {
        "scheduler": tiny_scheduler(),
        "vae": tiny_vae(seed),
        **tiny_text_encoders(seed),
        "transformer": tiny_transformer(seed, fill=kind == "fill"),
    }
    controlnet = _controlnet_for(kind, seed)
    if controlnet is not None:
        components["controlnet"] = controlnet
    pipeline = pipeline_class(**components)
    # tqdm bars on every call only clutter test output.
    pipeline.set_progress_bar_config(disable=True)
    logger.debug("built tiny %s pipeline (%s, seed %d)", kind, pipeline_class.__name__, seed)
    return pipeline


def _controlnet_for(kind: str, seed: int) -> torch.nn.Module | None:
    """The ControlNet a kind needs, or None for kinds without one."""
    if kind == "controlnet":
        return tiny_controlnet(seed)
    if kind == "controlnet-union":
        return tiny_controlnet(seed, "controlnet-union", num_mode=_UNION_NUM_MODES)
    if kind == "multi-controlnet":
        nets = [tiny_controlnet(seed, f"controlnet-{index}") for index in range(2)]
        return FluxMultiControlNetModel(nets).eval()
    return None


def tiny_call_kwargs(kind: str, seed: int = 0) -> dict[str, Any]:
    """Call arguments that run ``tiny_pipeline(kind)`` for 2 steps at 32x32, returning a tensor.

    A fresh dict (with a fresh ``torch.Generator`` seeded from ``seed``) is built every time, so
    ``tiny_pipeline(kind)(**tiny_call_kwargs(kind))`` is reproducible bit for bit. The images are
    PIL images drawn from ``seed``; ``output_type="pt"`` makes the output ``images`` a float tensor
    of shape ``(1, 3, 32, 32)``.

    Raises:
        InvalidRequestError: ``kind`` is not one of :data:`TINY_KINDS`.
    """
    _check_kind(kind)
    kwargs: dict[str, Any] = {
        "prompt": _PROMPT,
        "num_inference_steps": 2,
        "height": TINY_IMAGE_SIZE,
        "width": TINY_IMAGE_SIZE,
        "guidance_scale": 3.5,
        "max_sequence_length": _MAX_SEQUENCE_LENGTH,
        "output_type": "pt",
        "generator": torch.Generator("cpu").manual_seed(seed),
    }
    kwargs.update(_kind_kwargs(kind, seed))
    return kwargs


def _kind_kwargs(kind: str, seed: int) -> dict[str, Any]:
    """The arguments one kind adds to the common ones (images, masks, strengths, control inputs)."""
    if kind == "img2img":
        # Below 1.0 so the init image matters; with 2 steps this runs 1 denoising step.
        return {"image": _random_image(seed, "image"), "strength": 0.75}
    if kind == "inpaint":
        return {"image": _random_image(seed, "image"), "mask_image": _square_mask(), "strength": 0.75}
    if kind == "fill":
        # FLUX.1-Fill's own default guidance.
        return {"image": _random_image(seed, "image"), "mask_image": _square_mask(), "guidance_scale": 30.0}
    if kind == "kontext":
        # Kontext rescales height x width to max_area and, with _auto_resize, resizes the input image
        # to one of its ~1 megapixel training resolutions: both would defeat a tiny test.
        return {"image": _random_image(seed, "image"), "max_area": TINY_IMAGE_SIZE**2, "_auto_resize": False}
    if kind == "controlnet":
        return {"control_image": _random_image(seed, "control"), "controlnet_conditioning_scale": 0.7}
    if kind == "controlnet-union":
        return {
            "control_image": _random_image(seed, "control"),
            "control_mode": _UNION_CONTROL_MODE,
            "controlnet_conditioning_scale": 0.7,
        }
    if kind == "multi-controlnet":
        return {
            "control_image": [_random_image(seed, "control-0"), _random_image(seed, "control-1")],
            "controlnet_conditioning_scale": [0.6, 0.4],
        }
    return {}


def _random_image(seed: int, role: str) -> Image.Image:
    """A 32x32 RGB noise image drawn from ``(seed, role)`` with a local generator (global RNG untouched)."""
    generator = torch.Generator("cpu").manual_seed(zlib.crc32(f"{seed}:{role}".encode()))
    pixels = torch.randint(0, 256, (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), mode="RGB")


def _square_mask() -> Image.Image:
    """A 32x32 mask, white (repaint) in the central 16x16 square and black (keep) around it."""
    mask = np.zeros((TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), dtype=np.uint8)
    quarter = TINY_IMAGE_SIZE // 4
    mask[quarter:-quarter, quarter:-quarter] = 255
    return Image.fromarray(mask, mode="L")
