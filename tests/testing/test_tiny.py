"""Tests of the offline tiny FLUX test bed, ``vramkit.testing``."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.models.controlnets.controlnet_flux import FluxControlNetModel, FluxMultiControlNetModel
from transformers import CLIPTextModel, PreTrainedTokenizerFast, T5EncoderModel

from vramkit.errors import InvalidRequestError
from vramkit.testing import TINY_KINDS, tiny_call_kwargs, tiny_pipeline

# Belt and braces: nothing here may reach the hub, even if a test environment forgot to say so.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXPECTED_CLASSES = {
    "flux": FluxPipeline,
    "img2img": FluxImg2ImgPipeline,
    "inpaint": FluxInpaintPipeline,
    "fill": FluxFillPipeline,
    "kontext": FluxKontextPipeline,
    "controlnet": FluxControlNetPipeline,
    "controlnet-union": FluxControlNetPipeline,
    "multi-controlnet": FluxControlNetPipeline,
}
CONTROLNET_KINDS = ("controlnet", "controlnet-union", "multi-controlnet")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run each test on one intra-op thread, then restore the previous count.

    The tensors are tiny, so a second thread buys nothing; and when other processes compete for
    the machine's two cores, OpenMP threads waiting on each other made this file >10x slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _modules(pipe: object) -> dict[str, torch.nn.Module]:
    """The pipeline's torch modules, by component name."""
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}  # type: ignore[attr-defined]


def _run(kind: str, seed: int = 0) -> torch.Tensor:
    """Build a fresh pipeline and call it with fresh kwargs; return the images tensor."""
    return tiny_pipeline(kind, seed)(**tiny_call_kwargs(kind, seed)).images


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Same parameter and buffer names, and bit-identical values."""
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_kinds_listed() -> None:
    assert set(TINY_KINDS) == set(EXPECTED_CLASSES)
    assert len(TINY_KINDS) == len(set(TINY_KINDS))


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_pipeline_class_and_components(kind: str) -> None:
    pipe = tiny_pipeline(kind)
    assert type(pipe) is EXPECTED_CLASSES[kind]
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(pipe.tokenizer, PreTrainedTokenizerFast)
    assert isinstance(pipe.tokenizer_2, PreTrainedTokenizerFast)
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    if kind == "controlnet":
        assert isinstance(pipe.controlnet, FluxControlNetModel)
        assert pipe.controlnet.config.num_mode is None
    elif kind == "controlnet-union":
        assert isinstance(pipe.controlnet, FluxControlNetModel)
        assert pipe.controlnet.config.num_mode is not None
    elif kind == "multi-controlnet":
        assert isinstance(pipe.controlnet, FluxMultiControlNetModel)
        assert len(pipe.controlnet.nets) == 2
        assert all(isinstance(net, FluxControlNetModel) for net in pipe.controlnet.nets)
    else:
        assert getattr(pipe, "controlnet", None) is None


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_components_cpu_float32_eval(kind: str) -> None:
    for name, module in _modules(tiny_pipeline(kind)).items():
        assert not module.training, name
        assert all(not m.training for m in module.modules()), name
        for tensor in [*module.parameters(), *module.buffers()]:
            assert tensor.device.type == "cpu", name
            if tensor.is_floating_point():
                assert tensor.dtype == torch.float32, name
    assert tiny_pipeline(kind).device.type == "cpu"


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_dimensions_agree(kind: str) -> None:
    pipe = tiny_pipeline(kind)
    transformer = pipe.transformer.config
    assert transformer.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert transformer.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert transformer.num_layers >= 2 and transformer.num_single_layers >= 2
    assert len(pipe.transformer.transformer_blocks) >= 2 and len(pipe.transformer.single_transformer_blocks) >= 2
    assert pipe.text_encoder_2.config.dropout_rate == 0.0
    vae = pipe.vae.config
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    assert vae.sample_size == tiny_call_kwargs(kind)["height"]
    assert transformer.out_channels == vae.latent_channels * 4
    scale = 2 ** (len(vae.block_out_channels) - 1)
    if kind == "fill":
        # packed latents + packed masked-image latents + the mask unshuffled per latent pixel, packed
        assert transformer.in_channels == vae.latent_channels * 4 * 2 + scale * scale * 4
    else:
        assert transformer.in_channels == vae.latent_channels * 4


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_token_ids_below_vocab(kind: str) -> None:
    pipe = tiny_pipeline(kind)
    text = "A Tiny RED fox, jumping over 42 lazy dogs! Ünïcödé ✨ 日本 <pad> </s>"
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer.convert_tokens_to_ids("<|startoftext|>") == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer_2.eos_token_id == 1
    assert pipe.tokenizer_2.unk_token_id == 2
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        assert len(tokenizer) <= encoder.config.vocab_size
        ids = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77
        assert 0 <= min(ids) and max(ids) < encoder.config.vocab_size


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_call_output_shape(kind: str) -> None:
    kwargs = tiny_call_kwargs(kind)
    assert kwargs["num_inference_steps"] == 2
    images = tiny_pipeline(kind)(**kwargs).images
    assert isinstance(images, torch.Tensor)
    assert images.shape == (1, 3, kwargs["height"], kwargs["width"])
    assert torch.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_fresh_builds_are_bit_identical(kind: str) -> None:
    first, second = tiny_pipeline(kind), tiny_pipeline(kind)
    modules_first, modules_second = _modules(first), _modules(second)
    assert modules_first.keys() == modules_second.keys()
    for name in modules_first:
        _assert_same_weights(modules_first[name], modules_second[name])
    assert torch.equal(_run(kind), _run(kind))


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_same_pipeline_twice_is_bit_identical(kind: str) -> None:
    pipe = tiny_pipeline(kind)
    assert torch.equal(pipe(**tiny_call_kwargs(kind)).images, pipe(**tiny_call_kwargs(kind)).images)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_building_leaves_global_rng_alone(kind: str) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    tiny_pipeline(kind, seed=7)
    tiny_call_kwargs(kind, seed=7)
    assert torch.equal(torch.get_rng_state(), before)


def test_seed_changes_weights_and_output() -> None:
    a, b = tiny_pipeline("flux", seed=0), tiny_pipeline("flux", seed=1)
    assert not torch.equal(a.transformer.x_embedder.weight, b.transformer.x_embedder.weight)
    assert not torch.equal(_run("flux", 0), _run("flux", 1))


def test_shared_components_match_across_kinds() -> None:
    # Seeding per component means a kind's extras (a ControlNet, the Fill transformer) do not
    # shift the weights of the components it shares with plain "flux".
    flux, controlnet = tiny_pipeline("flux"), tiny_pipeline("controlnet")
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        _assert_same_weights(getattr(flux, name), getattr(controlnet, name))


@pytest.mark.parametrize("kind", CONTROLNET_KINDS)
def test_controlnet_changes_the_output(kind: str) -> None:
    # diffusers zero-initialises ControlNet outputs; the test bed must not, or a ControlNet that
    # silently did not run would go unnoticed.
    pipe = tiny_pipeline(kind)
    kwargs = tiny_call_kwargs(kind)
    scale = kwargs["controlnet_conditioning_scale"]
    off = tiny_call_kwargs(kind)
    off["controlnet_conditioning_scale"] = [0.0] * len(scale) if isinstance(scale, list) else 0.0
    assert not torch.equal(pipe(**kwargs).images, pipe(**off).images)


def test_multi_controlnet_nets_differ() -> None:
    nets = tiny_pipeline("multi-controlnet").controlnet.nets
    assert not torch.equal(nets[0].x_embedder.weight, nets[1].x_embedder.weight)


def test_union_control_mode_is_an_int_and_matters() -> None:
    pipe = tiny_pipeline("controlnet-union")
    kwargs = tiny_call_kwargs("controlnet-union")
    assert isinstance(kwargs["control_mode"], int)
    assert 0 <= kwargs["control_mode"] < pipe.controlnet.config.num_mode
    other = tiny_call_kwargs("controlnet-union")
    other["control_mode"] = (kwargs["control_mode"] + 1) % pipe.controlnet.config.num_mode
    assert not torch.equal(pipe(**kwargs).images, pipe(**other).images)


def test_multi_controlnet_kwargs_are_lists() -> None:
    kwargs = tiny_call_kwargs("multi-controlnet")
    assert isinstance(kwargs["control_image"], list) and len(kwargs["control_image"]) == 2
    assert isinstance(kwargs["controlnet_conditioning_scale"], list)


def test_built_the_same_under_foreign_default_dtype_and_device() -> None:
    reference = tiny_pipeline("flux")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            pipe = tiny_pipeline("flux")
    finally:
        torch.set_default_dtype(previous)
    for name, module in _modules(pipe).items():
        _assert_same_weights(module, getattr(reference, name))


@pytest.mark.parametrize("builder", [tiny_pipeline, tiny_call_kwargs])
def test_unknown_kind(builder: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        builder("sdxl")  # type: ignore[operator]
    message = str(info.value)
    assert "sdxl" in message
    assert all(kind in message for kind in TINY_KINDS)
