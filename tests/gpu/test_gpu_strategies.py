"""Strategies on a real CUDA device (skipped without one): tiny pipelines, outputs compared with the
unoptimized pipeline on the same GPU. Run on the GPU machine: `python -m pytest tests/gpu -q`."""

from __future__ import annotations

import pytest
import torch

import vramkit
from vramkit.strategies import (
    AttentionSlicing,
    ModelOffload,
    PromptCache,
    Quantize,
    SequentialOffload,
    StoreFP8,
    VaeSlicing,
)
from vramkit.strategies.quantize import backend_available
from vramkit.testing import tiny_call_kwargs, tiny_pipeline
from vramkit.testing.checks import assert_no_hooks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _run(pipe, kind):
    kwargs = tiny_call_kwargs(kind)
    return pipe(**kwargs).images.float().cpu()


@pytest.mark.parametrize("kind", ["flux", "fill", "controlnet-union"])
@pytest.mark.parametrize(
    "strategies",
    [
        [ModelOffload()],
        [SequentialOffload()],
        [PromptCache(), ModelOffload()],
        [AttentionSlicing(chunk=64), VaeSlicing()],
    ],
    ids=["model-offload", "sequential", "prompt-cache+model-offload", "slicing"],
)
def test_lossless_on_cuda(kind, strategies):
    pipe = tiny_pipeline(kind).to("cuda")
    _run(pipe, kind)
    reference = _run(pipe, kind)
    pipe2 = tiny_pipeline(kind)
    if not any(isinstance(s, (ModelOffload, SequentialOffload)) for s in strategies):
        pipe2 = pipe2.to("cuda")
    vramkit.optimize(pipe2, strategies=strategies)
    out = _run(pipe2, kind)
    assert torch.equal(out, reference)
    if any(isinstance(s, ModelOffload) for s in strategies):
        # after the call everything is back in host RAM
        assert all(p.device.type == "cpu" for p in pipe2.transformer.parameters())
    vramkit.restore(pipe2)
    assert_no_hooks(pipe2, type(pipe2))


@pytest.mark.parametrize(
    "strategy,tolerance",
    [(StoreFP8(), 0.06), (Quantize("int8", "torchao"), 0.02), (Quantize("nf4", "bitsandbytes"), 0.2),
     (Quantize("int8", "bitsandbytes"), 0.05)],
    ids=["fp8", "int8-torchao", "nf4-bnb", "int8-bnb"],
)
def test_lossy_on_cuda(strategy, tolerance):
    if isinstance(strategy, Quantize) and not backend_available(strategy.backend):
        pytest.skip(f"{strategy.backend} not installed")
    pipe = tiny_pipeline("flux").to("cuda", torch.bfloat16)
    reference = _run(pipe, "flux")
    pipe2 = tiny_pipeline("flux").to("cuda", torch.bfloat16)
    vramkit.optimize(pipe2, strategies=[strategy])
    out = _run(pipe2, "flux")
    assert (out - reference).abs().max().item() <= tolerance


@pytest.mark.parametrize("encoders_on", ["cuda", "cpu"])
def test_parked_text_encoders_on_cuda_bit_identical(encoders_on):
    """The smallest-budget plan's text encoders: T5 streamed and CLIP with every layer resident, both
    parked (rest included) after each prompt. Same images as the unoptimized pipeline on this GPU;
    nothing of either encoder on the GPU between prompts; restore gives back every hook and tensor."""
    from vramkit.strategies import BlockStreaming

    pipe = tiny_pipeline("flux").to("cuda")
    _run(pipe, "flux")
    reference = [_run(pipe, "flux") for _ in range(2)]
    if encoders_on == "cpu":
        # The real case: the encoders start in host RAM, stream to the GPU, and restore puts them back.
        pipe.text_encoder.to("cpu")
        pipe.text_encoder_2.to("cpu")
    params = {n: dict(pipe.components[n].named_parameters(remove_duplicate=False))
              for n in ("text_encoder", "text_encoder_2")}
    n_clip = len(pipe.text_encoder.encoder.layers) if hasattr(pipe.text_encoder, "encoder") else len(
        pipe.text_encoder.text_model.encoder.layers
    )
    vramkit.optimize(pipe, strategies=[
        BlockStreaming(resident=0, components=("text_encoder_2",), park_after_forward=True, park_rest=True),
        BlockStreaming(resident=n_clip, components=("text_encoder",), park_after_forward=True, park_rest=True),
    ])
    outs = [_run(pipe, "flux") for _ in range(2)]
    assert all(torch.equal(o, r) for o, r in zip(outs, reference))
    for name in ("text_encoder", "text_encoder_2"):
        tensors = [t for t in pipe.components[name].parameters() if t.is_floating_point() and t.numel() > 1]
        assert all(0 in t.stride() for t in tensors), name  # parked: expanded zeros, no storage
    vramkit.restore(pipe)
    assert_no_hooks(pipe, type(pipe))
    for name, before in params.items():
        now = dict(pipe.components[name].named_parameters(remove_duplicate=False))
        assert all(now[k] is before[k] and now[k].device.type == encoders_on for k in before), name
    if encoders_on == "cpu":
        pipe.text_encoder.to("cuda")
        pipe.text_encoder_2.to("cuda")
    assert torch.equal(_run(pipe, "flux"), reference[0])
