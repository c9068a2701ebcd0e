"""Every row of the bad-input table in docs/bad-input.md: each input gets a vramkit error (or the
documented behaviour), and the pipeline is left exactly as it was."""

from __future__ import annotations

import pytest
import torch

import vramkit
from vramkit._pipeline import snapshot
from vramkit.errors import (
    InvalidBudgetError,
    InvalidRequestError,
    PlanInfeasibleError,
    StrategyConflictError,
    UnsupportedPipelineError,
)
from vramkit.memory.probe import DeviceProbe
from vramkit.planner import budget_for
from vramkit.strategies import VaeSlicing
from vramkit.testing import tiny_pipeline
from vramkit.testing.checks import run_tiny as run

GiB = 2**30

ROWS = [
    ("vram=0", dict(vram=0), InvalidBudgetError, "more than zero"),
    ("vram negative", dict(vram="-1GiB"), InvalidBudgetError, "more than zero"),
    ("vram not a size", dict(vram="lots"), InvalidBudgetError, "could not parse"),
    ("vram % without a GPU", dict(vram="50%"), InvalidBudgetError, "device total is not known"),
    ("vram below the feasible minimum", dict(vram="1KiB"), PlanInfeasibleError, "smallest plan needs"),
    ("height not a multiple of 16", dict(vram="8GiB", height=1000, width=1024), InvalidRequestError, "nearest valid"),
    ("height zero", dict(vram="8GiB", height=0, width=1024), InvalidRequestError, "positive"),
    ("height huge", dict(vram="8GiB", height=100000, width=1024), InvalidRequestError, "8192"),
    ("batch 0", dict(vram="8GiB", batch_size=0), InvalidRequestError, ">= 1"),
    ("unknown quality", dict(vram="8GiB", quality="best"), InvalidRequestError, "lossless"),
    ("ram not a size", dict(vram="8GiB", ram="much"), InvalidBudgetError, "could not parse"),
]


@pytest.mark.parametrize("label,kwargs,error,message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_request_is_refused_and_pipeline_untouched(label, kwargs, error, message):
    pipe = tiny_pipeline("flux")
    before = snapshot(pipe)
    with pytest.raises(error, match=message):
        vramkit.optimize(pipe, **kwargs)
    assert snapshot(pipe) == before


def test_vram_larger_than_the_device_is_refused():
    probe = DeviceProbe("cuda:0", "Test GPU", 24 * GiB, 20 * GiB, 64 * GiB, 48 * GiB, 24 * GiB, 25e9, "measured")
    with pytest.raises(InvalidBudgetError, match="more than the 24.00 GiB"):
        budget_for(probe, vram="200GiB")
    with pytest.raises(InvalidBudgetError, match="more than 100%"):
        budget_for(probe, vram="150%")


def test_minimum_from_the_error_plans():
    pipe = tiny_pipeline("flux")
    with pytest.raises(PlanInfeasibleError) as info:
        vramkit.plan(pipe, vram="1KiB")
    assert info.value.minimum_vram and vramkit.plan(pipe, vram=info.value.minimum_vram).steps


def test_meta_pipeline():
    pipe = tiny_pipeline("flux")
    pipe.transformer.to_empty(device="meta")
    with pytest.raises(UnsupportedPipelineError, match="meta"):
        vramkit.optimize(pipe, vram="8GiB")
    # Planning only needs sizes, so it works on the meta device.
    assert vramkit.plan(pipe, vram="8GiB", height=512, width=512).predicted is not None


def test_pipeline_quantized_before_vramkit_is_planned_as_it_is():
    """A transformer quantized by the user's own call (torchao int8 here) is sized as it is stored."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    pipe = tiny_pipeline("flux")
    quantize_(pipe.transformer, Int8WeightOnlyConfig())
    reference = run(pipe, "flux")
    plan = vramkit.optimize(pipe, vram="8GiB", height=32, width=32, quality="lossless")
    assert torch.equal(run(pipe, "flux"), reference)
    assert not any(s.strategy.name in ("StoreFP8", "Quantize") for s in plan.steps)
    vramkit.restore(pipe)


def test_components_on_different_devices_are_planned_from_their_sizes():
    """Components split between the meta device and the CPU (the CPU stand-in for two devices):
    planning reads sizes only and works; applying refuses the meta one."""
    pipe = tiny_pipeline("flux")
    pipe.text_encoder_2.to_empty(device="meta")
    assert vramkit.plan(pipe, vram="8GiB", height=32, width=32) is not None
    with pytest.raises(UnsupportedPipelineError, match="text_encoder_2"):
        vramkit.optimize(pipe, vram="8GiB")


def test_optimize_twice_and_call_after_restore():
    pipe = tiny_pipeline("flux")
    reference = run(pipe, "flux")
    vramkit.optimize(pipe, strategies=[VaeSlicing()])
    with pytest.raises(StrategyConflictError, match="already optimized"):
        vramkit.optimize(pipe, vram="8GiB")
    vramkit.restore(pipe)
    assert torch.equal(run(pipe, "flux"), reference)
    vramkit.restore(pipe)  # a second restore is a no-op
    assert torch.equal(run(pipe, "flux"), reference)


@pytest.mark.parametrize("enable", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_pipeline_offloaded_by_diffusers(enable):
    pipe = tiny_pipeline("flux")
    getattr(pipe, enable)(device="cpu")
    before = snapshot(pipe)
    with pytest.raises(StrategyConflictError, match="remove_all_hooks"):
        vramkit.optimize(pipe, vram="8GiB")
    assert snapshot(pipe) == before


def test_not_a_flux_pipeline():
    with pytest.raises(UnsupportedPipelineError):
        vramkit.optimize(object(), vram="8GiB")
    with pytest.raises(UnsupportedPipelineError):
        vramkit.plan(object(), vram="8GiB")


def test_a_planned_lossy_step_is_announced(caplog):
    pipe = tiny_pipeline("flux")  # fp32 weights: quality="auto" may choose bf16
    with caplog.at_level("WARNING", logger="vramkit"):
        plan = vramkit.optimize(pipe, vram="8GiB", height=32, width=32, quality="auto")
    if plan.lossless:
        pytest.skip("the planner chose a lossless plan for this request")
    assert any("change numerics" in r.getMessage() for r in caplog.records)
    lossless = tiny_pipeline("flux")
    assert vramkit.optimize(lossless, vram="8GiB", height=32, width=32, quality="lossless").lossless
