"""optimize/restore contract: bad input gets the matching vramkit error and leaves the pipeline
exactly as it was; conflicts, double application, foreign hooks; Plan JSON round trip."""

from __future__ import annotations

import json

import pytest
import torch

import vramkit
from vramkit._pipeline import snapshot
from vramkit.errors import (
    InvalidRequestError,
    IrreversibleError,
    StrategyConflictError,
    UnsupportedPipelineError,
    VramkitError,
)
from vramkit.plan import Plan
from vramkit.strategies import (
    AttentionSlicing,
    GradientCheckpointing,
    ModelOffload,
    Precision,
    PromptCache,
    Quantize,
    SequentialOffload,
    StoreFP8,
    VaeSlicing,
    VaeTiling,
)
from vramkit.testing import tiny_pipeline
from vramkit.testing.checks import assert_no_hooks
from vramkit.testing.checks import run_tiny as run


@pytest.fixture
def pipe():
    return tiny_pipeline("flux")


def _unchanged(pipe, before) -> None:
    assert snapshot(pipe) == before


def test_non_flux_pipeline_is_refused():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    other = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(UnsupportedPipelineError, match="Flux"):
        vramkit.optimize(other, strategies=[VaeSlicing()])
    with pytest.raises(UnsupportedPipelineError, match="diffusers Flux pipelines"):
        vramkit.optimize(torch.nn.Linear(2, 2), strategies=[VaeSlicing()])


def test_unknown_component_is_refused_and_pipeline_untouched(pipe):
    before = snapshot(pipe)
    with pytest.raises(InvalidRequestError, match="unknown component.*transformer"):
        vramkit.optimize(pipe, strategies=[Precision("fp32"), AttentionSlicing(chunk=64, components=("unet",))])
    _unchanged(pipe, before)


@pytest.mark.parametrize(
    "strategies",
    [
        [ModelOffload(device="cpu"), SequentialOffload(device="cpu")],
        [StoreFP8(), Quantize("int8", "torchao")],
        [SequentialOffload(device="cpu"), StoreFP8()],
    ],
    ids=["model+sequential", "fp8+int8", "sequential+fp8"],
)
def test_conflicting_strategies_are_refused(pipe, strategies):
    before = snapshot(pipe)
    with pytest.raises(StrategyConflictError, match="conflict"):
        vramkit.optimize(pipe, strategies=strategies)
    _unchanged(pipe, before)


def test_strategy_twice_is_refused(pipe):
    before = snapshot(pipe)
    with pytest.raises(StrategyConflictError, match="applied twice"):
        vramkit.optimize(pipe, strategies=[VaeSlicing(), VaeSlicing()])
    _unchanged(pipe, before)


def test_optimize_twice_is_refused_until_restore(pipe):
    vramkit.optimize(pipe, strategies=[VaeSlicing()])
    with pytest.raises(StrategyConflictError, match="restore"):
        vramkit.optimize(pipe, strategies=[AttentionSlicing(chunk=64)])
    vramkit.restore(pipe)
    vramkit.optimize(pipe, strategies=[AttentionSlicing(chunk=64)])
    vramkit.restore(pipe)


@pytest.mark.parametrize("enable", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_pipeline_offloaded_by_diffusers_is_refused(pipe, enable):
    getattr(pipe, enable)(device="cpu")
    before = snapshot(pipe)
    with pytest.raises(StrategyConflictError, match="remove_all_hooks"):
        vramkit.optimize(pipe, strategies=[VaeSlicing()])
    _unchanged(pipe, before)


def test_pipeline_with_diffusers_layerwise_casting_is_refused(pipe):
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(StrategyConflictError, match="layerwise_casting"):
        vramkit.optimize(pipe, strategies=[VaeSlicing()])


def test_failure_mid_apply_undoes_what_was_applied(pipe, monkeypatch):
    from vramkit.strategies import base

    reference = run(pipe, "flux")
    before = snapshot(pipe)

    def broken(pipe, config, component):
        raise RuntimeError("simulated failure inside the mechanism")

    monkeypatch.setitem(base._REGISTRY, VaeSlicing, broken)
    with pytest.raises(VramkitError, match="simulated failure.*undone"):
        vramkit.optimize(
            pipe, strategies=[AttentionSlicing(chunk=64), ModelOffload(device="cpu"), PromptCache(), VaeSlicing()]
        )
    _unchanged(pipe, before)
    assert_no_hooks(pipe, type(pipe))
    assert torch.equal(run(pipe, "flux"), reference)


def test_gradient_checkpointing_refused_in_eval_mode(pipe):
    before = snapshot(pipe)
    with pytest.raises(InvalidRequestError, match="eval mode"):
        vramkit.optimize(pipe, strategies=[VaeSlicing(), GradientCheckpointing()])
    _unchanged(pipe, before)


def test_gradient_checkpointing_in_train_mode_and_undo(pipe):
    pipe.transformer.train()
    vramkit.optimize(pipe, strategies=[GradientCheckpointing()])
    assert pipe.transformer.gradient_checkpointing
    vramkit.restore(pipe)
    assert not pipe.transformer.gradient_checkpointing


def test_restore_with_irreversible_step_undoes_the_rest_and_keeps_working(pipe):
    vramkit.optimize(pipe, strategies=[StoreFP8(), ModelOffload(device="cpu"), VaeSlicing()])
    with pytest.raises(IrreversibleError, match="StoreFP8") as info:
        vramkit.restore(pipe)
    assert info.value.steps and "StoreFP8" in info.value.steps[0]
    assert not pipe.vae.use_slicing
    assert not any(hasattr(m, "_hf_hook") for m in pipe.transformer.modules())
    assert torch.isfinite(run(pipe, "flux")).all()
    # The leftover fp8 storage still counts: applying it again is refused.
    with pytest.raises(StrategyConflictError, match="applied twice"):
        vramkit.optimize(pipe, strategies=[StoreFP8()])


def test_restore_on_untouched_pipeline_is_a_no_op(pipe):
    before = snapshot(pipe)
    vramkit.restore(pipe)
    _unchanged(pipe, before)


def test_call_after_restore_works(pipe):
    reference = run(pipe, "flux")
    vramkit.optimize(pipe, strategies=[SequentialOffload(device="cpu")])
    vramkit.restore(pipe)
    assert torch.equal(run(pipe, "flux"), reference)


def test_plan_json_round_trip_and_explain(pipe):
    plan = vramkit.optimize(
        pipe, strategies=[Precision("fp32"), AttentionSlicing(chunk=128), VaeTiling(tile=256), PromptCache()]
    )
    data = json.loads(json.dumps(plan.to_dict()))
    again = Plan.from_dict(data)
    assert again.to_dict() == plan.to_dict()
    assert [s.strategy for s in again.steps] == [s.strategy for s in plan.steps]
    text = plan.explain()
    for name in ("Precision", "AttentionSlicing", "VaeTiling", "PromptCache"):
        assert name in text
    assert "changes numerics" in text  # VaeTiling
    assert plan._repr_html_().startswith("<pre>")
    assert vramkit.applied_plan(pipe) is plan
    vramkit.restore(pipe)


def test_steps_are_applied_in_a_safe_order(pipe):
    plan = vramkit.optimize(pipe, strategies=[ModelOffload(device="cpu"), PromptCache(), Precision("fp32")])
    assert [s.strategy.name for s in plan.steps][0] == "Precision"
    assert [s.strategy.name for s in plan.steps][-1] == "ModelOffload"
    vramkit.restore(pipe)


def test_not_a_strategy_is_refused(pipe):
    with pytest.raises(StrategyConflictError, match="vramkit.strategies"):
        vramkit.optimize(pipe, strategies=["VaeSlicing"])


@pytest.mark.parametrize(
    "make",
    [
        lambda: AttentionSlicing(chunk=0),
        lambda: AttentionSlicing(chunk=-4),
        lambda: AttentionSlicing(chunk=1.5),
        lambda: VaeTiling(tile=10),
        lambda: VaeTiling(tile=512, overlap=0.9),
        lambda: Precision("int4"),
        lambda: Quantize("int3"),
        lambda: Quantize("nf4", "torchao"),
        lambda: PromptCache(release="gpu"),
        lambda: Precision("bf16", components=()),
    ],
)
def test_bad_strategy_arguments(make):
    with pytest.raises(InvalidRequestError):
        make()


def test_meta_pipeline_is_refused():
    pipe = tiny_pipeline("flux")
    pipe.transformer.to_empty(device="meta")
    with pytest.raises(UnsupportedPipelineError, match="meta"):
        vramkit.optimize(pipe, strategies=[VaeSlicing()])
