"""Every strategy on every tiny pipeline kind: lossless ones bit-identical to the unoptimized
pipeline, lossy ones within a stated tolerance, and restore leaves the pipeline exactly as built."""

from __future__ import annotations

import pytest
import torch

import vramkit
from vramkit.errors import IrreversibleError
from vramkit.strategies import (
    AttentionBackend,
    AttentionSlicing,
    BlockStreaming,
    ModelOffload,
    Precision,
    PromptCache,
    Quantize,
    Resident,
    SequentialOffload,
    StoreFP8,
    VaeSlicing,
    VaeTiling,
)
from vramkit.strategies.quantize import backend_available
from vramkit.testing import TINY_KINDS, tiny_pipeline
from vramkit.testing.checks import assert_no_hooks
from vramkit.testing.checks import run_tiny as run

LOSSLESS = [
    pytest.param(Precision("fp32"), id="precision-fp32"),
    pytest.param(ModelOffload(device="cpu"), id="model-offload"),
    pytest.param(SequentialOffload(device="cpu"), id="sequential-offload"),
    pytest.param(AttentionSlicing(chunk=64), id="attention-slicing"),
    pytest.param(AttentionBackend("native"), id="attention-backend-native"),
    pytest.param(VaeSlicing(), id="vae-slicing"),
    pytest.param(PromptCache(release="cpu"), id="prompt-cache"),
    pytest.param(Resident(components=("text_encoder", "transformer", "vae"), device="cpu"), id="resident"),
    # Without CUDA, BlockStreaming is a planned no-op step (its reason says so); with CUDA it streams.
    pytest.param(BlockStreaming(resident=1), id="block-streaming"),
]

# Tolerances on the [0, 1] image of a 2-step tiny pipeline, measured on CPU and rounded up about 3x.
LOSSY = [
    pytest.param(Precision("bf16"), 0.08, id="precision-bf16"),
    pytest.param(StoreFP8(), 0.06, id="store-fp8"),
    pytest.param(Quantize("int8", "torchao"), 0.02, id="int8-torchao"),
    pytest.param(Quantize("int8", "quanto"), 0.02, id="int8-quanto"),
    pytest.param(Quantize("fp8", "quanto"), 0.12, id="fp8-quanto"),
]


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("strategy", LOSSLESS)
def test_lossless_strategy_is_bit_identical_and_restores(kind, strategy, reference_outputs):
    reference = reference_outputs[kind]
    pipe = tiny_pipeline(kind)
    built_class = type(pipe)
    plan = vramkit.optimize(pipe, strategies=[strategy])
    assert plan.steps, "the strategy applied to no component"
    assert plan.lossless
    assert all(step.reversible for step in plan.steps)
    assert torch.equal(run(pipe, kind), reference)
    assert torch.equal(run(pipe, kind), reference)  # a second call too (hooks re-armed)
    vramkit.restore(pipe)
    assert_no_hooks(pipe, built_class)
    assert torch.equal(run(pipe, kind), reference)


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("strategy,tolerance", LOSSY)
def test_lossy_strategy_within_tolerance_and_marked(kind, strategy, tolerance, reference_outputs):
    if isinstance(strategy, Quantize) and not backend_available(strategy.backend):
        pytest.skip(f"{strategy.backend} not installed")
    reference = reference_outputs[kind]
    pipe = tiny_pipeline(kind)
    plan = vramkit.optimize(pipe, strategies=[strategy])
    assert not plan.lossless
    assert any(not step.lossless for step in plan.steps)
    assert "changes numerics" in plan.explain()
    out = run(pipe, kind)
    assert out.shape == reference.shape
    assert torch.isfinite(out).all()
    diff = (out.float() - reference).abs().max().item()
    assert diff <= tolerance, f"{strategy.describe()} differs by {diff} > {tolerance}"
    assert diff > 0, "a lossy strategy that changes nothing was probably not applied"
    with pytest.raises(IrreversibleError) as info:
        vramkit.restore(pipe)
    assert strategy.name in str(info.value)
    # The pipeline still works after the failed restore.
    assert torch.isfinite(run(pipe, kind)).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only skip path")
def test_bitsandbytes_needs_cuda_says_so():
    pipe = tiny_pipeline("flux")
    if not backend_available("bitsandbytes"):
        with pytest.raises(vramkit.errors.MissingDependencyError, match="pip install bitsandbytes"):
            vramkit.optimize(pipe, strategies=[Quantize("int8", "bitsandbytes")])
    else:  # pragma: no cover - depends on the environment
        with pytest.raises(vramkit.errors.VramkitError, match="CUDA"):
            vramkit.optimize(pipe, strategies=[Quantize("int8", "bitsandbytes")])


def test_vae_tiling_smaller_than_image_changes_little():
    pipe = tiny_pipeline("flux")
    reference = run(pipe, "flux", height=256, width=256)
    plan = vramkit.optimize(pipe, strategies=[VaeTiling(tile=64, overlap=0.25)])
    assert not plan.lossless
    calls = []
    original = pipe.vae.tiled_decode

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    pipe.vae.tiled_decode = spy
    out = run(pipe, "flux", height=256, width=256)
    del pipe.vae.tiled_decode
    assert calls, "the VAE did not decode in tiles"
    assert out.shape == reference.shape
    # A tiny random VAE has no smooth features, so seams show more than on a real one.
    assert (out - reference).abs().mean().item() < 0.1
    vramkit.restore(pipe)
    assert torch.equal(run(pipe, "flux", height=256, width=256), reference)


def test_vae_tiling_is_exact_when_the_image_fits_one_tile(reference_outputs):
    pipe = tiny_pipeline("flux")
    plan = vramkit.optimize(pipe, strategies=[VaeTiling(tile=512)])
    assert not plan.lossless  # marked: it can change numerics in general
    assert torch.equal(run(pipe, "flux"), reference_outputs["flux"])
    vramkit.restore(pipe)
    assert_no_hooks(pipe, type(pipe))


def test_fp16_keeps_t5_out_unless_forced():
    pipe = tiny_pipeline("flux")
    plan = vramkit.optimize(pipe, strategies=[Precision("fp16")])
    assert "text_encoder_2" not in [s.component for s in plan.steps]
    assert pipe.text_encoder_2.dtype == torch.float32
    assert pipe.transformer.dtype == torch.float16
    with pytest.raises(IrreversibleError):
        vramkit.restore(pipe)
    with pytest.raises(vramkit.errors.InvalidRequestError, match="overflows"):
        Precision("fp16", components=("text_encoder_2",)).target_components(["text_encoder_2"])
    forced = Precision("fp16", components=("text_encoder_2",), force=True)
    assert forced.target_components(["text_encoder_2"]) == ["text_encoder_2"]
