"""Acceptance properties of the planner on the full-size architectures (meta device, no GPU).

- the planned peak VRAM (every stage) and RAM never exceed the budget;
- more VRAM never gives a slower plan;
- an infeasible budget raises PlanInfeasibleError whose minimum_vram plans;
- quality="lossless" plans have no lossy step.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vramkit.errors import PlanInfeasibleError
from vramkit.planner import Budget, Request, plan_for

GiB = 1024**3
MODELS = ("flux-dev", "flux-schnell", "flux-fill", "flux-kontext", "flux-dev+controlnet-union")
LOSSY = {"StoreFP8", "Quantize", "VaeTiling"}

sides = st.integers(min_value=16, max_value=128).map(lambda k: 16 * k)  # 256..2048 in steps of 16
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _budget(vram: int, ram: int, bandwidth: float = 25e9) -> Budget:
    return Budget(vram=vram, ram=ram, pinned=int(0.55 * ram), bandwidth=bandwidth)


def _check_fits(plan, vram: int, ram: int) -> None:
    p = plan.predicted
    assert p is not None
    assert p.peak_vram <= vram
    assert p.peak_ram <= ram
    assert set(p.stages) >= {"text_encoding", "denoising_step", "vae_decode"}
    for stage in p.stages.values():
        assert stage.vram <= vram
        assert stage.ram <= ram
        assert stage.seconds >= 0
    assert p.peak_vram == max(s.vram for s in p.stages.values())
    assert p.seconds_per_step > 0 and p.seconds_per_image > 0
    for step in plan.steps:
        assert step.reason and any(ch.isdigit() for ch in step.reason)


def _plan_or_minimum(spec, req, vram, ram, quality):
    """The plan, or (when infeasible) the plan at the reported minimum budget."""
    try:
        return plan_for(spec, req, _budget(vram, ram), quality), vram
    except PlanInfeasibleError as exc:
        if exc.minimum_vram is None:  # not even infinite VRAM helps with this RAM
            assert exc.minimum_ram is None or exc.minimum_ram > ram
            return None, None
        assert exc.minimum_vram > vram
        plan = plan_for(spec, req, _budget(exc.minimum_vram, ram), quality)
        return plan, exc.minimum_vram


@SETTINGS
@given(
    model=st.sampled_from(MODELS),
    vram_gib=st.floats(min_value=2, max_value=80),
    ram_gib=st.floats(min_value=4, max_value=128),
    width=sides,
    height=sides,
    batch=st.integers(min_value=1, max_value=4),
    quality=st.sampled_from(("auto", "lossless")),
)
def test_peak_never_exceeds_the_budget(specs, model, vram_gib, ram_gib, width, height, batch, quality):
    spec = specs[model]
    vram, ram = int(vram_gib * GiB), int(ram_gib * GiB)
    req = Request(height=height, width=width, batch_size=batch, max_sequence_length=spec.default_max_sequence_length)
    plan, used = _plan_or_minimum(spec, req, vram, ram, quality)
    if plan is None:
        return
    _check_fits(plan, used, ram)
    if quality == "lossless":
        assert plan.lossless
        assert not any(s.strategy.name in LOSSY or getattr(s.strategy, "storage", None) for s in plan.steps)


@SETTINGS
@given(
    model=st.sampled_from(MODELS),
    vram_a=st.floats(min_value=2, max_value=80),
    extra=st.floats(min_value=0.01, max_value=40),
    ram_gib=st.floats(min_value=4, max_value=128),
    width=sides,
    height=sides,
    batch=st.integers(min_value=1, max_value=4),
    quality=st.sampled_from(("auto", "lossless")),
)
def test_more_vram_is_never_slower(specs, model, vram_a, extra, ram_gib, width, height, batch, quality):
    spec = specs[model]
    ram = int(ram_gib * GiB)
    req = Request(height=height, width=width, batch_size=batch, max_sequence_length=spec.default_max_sequence_length)
    small, big = int(vram_a * GiB), int((vram_a + extra) * GiB)
    try:
        a = plan_for(spec, req, _budget(small, ram), quality)
    except PlanInfeasibleError:
        return
    b = plan_for(spec, req, _budget(big, ram), quality)  # must not raise: more VRAM still fits
    assert b.predicted.seconds_per_image <= a.predicted.seconds_per_image * (1 + 1e-12)


@pytest.mark.parametrize("model", MODELS)
def test_monotone_sweep(specs, model):
    """A fine sweep of budgets at 1024^2: per-image time never goes up."""
    spec = specs[model]
    req = Request(max_sequence_length=spec.default_max_sequence_length)
    last = None
    for tenth in range(20, 800, 25):
        try:
            plan = plan_for(spec, req, _budget(tenth * GiB // 10, 64 * GiB), "auto")
        except PlanInfeasibleError:
            assert last is None
            continue
        t = plan.predicted.seconds_per_image
        if last is not None:
            assert t <= last * (1 + 1e-12)
        last = t
    assert last is not None


@pytest.mark.parametrize("quality", ["auto", "lossless"])
@pytest.mark.parametrize("model", MODELS)
def test_80gib_at_1024_is_all_resident(specs, model, quality):
    spec = specs[model]
    plan = plan_for(
        spec, Request(max_sequence_length=spec.default_max_sequence_length), _budget(80 * GiB, 64 * GiB), quality
    )
    names = {s.strategy.name for s in plan.steps}
    assert not names & {"ModelOffload", "SequentialOffload", "BlockStreaming", "PromptCache"}
    assert plan.lossless
    assert plan.predicted.peak_vram < 80 * GiB


@pytest.mark.parametrize("quality", ["auto", "lossless"])
def test_infeasible_reports_a_minimum_that_plans(specs, quality):
    spec = specs["flux-dev"]
    req = Request(height=2048, width=2048)
    with pytest.raises(PlanInfeasibleError) as info:
        plan_for(spec, req, _budget(1 * GiB, 64 * GiB), quality)
    exc = info.value
    assert exc.minimum_vram is not None and exc.minimum_vram > 1 * GiB
    assert "GiB" in str(exc)
    plan = plan_for(spec, req, _budget(exc.minimum_vram, 64 * GiB), quality)
    assert plan.predicted.peak_vram <= exc.minimum_vram
    with pytest.raises(PlanInfeasibleError):
        plan_for(spec, req, _budget(exc.minimum_vram - 1, 64 * GiB), quality)


def test_ram_infeasible_reports_minimum_ram(specs):
    # 8 GiB of RAM plans now (blocks stream from disk); 2 GiB cannot hold even the process baseline
    # plus the page cache of the blocks in flight.
    spec = specs["flux-dev"]
    with pytest.raises(PlanInfeasibleError) as info:
        plan_for(spec, Request(), _budget(8 * GiB, 2 * GiB), "auto")
    exc = info.value
    assert exc.minimum_ram is not None and exc.minimum_ram > 2 * GiB
    assert "RAM" in str(exc)
    ok = plan_for(spec, Request(), Budget(8 * GiB, exc.minimum_ram, int(0.55 * exc.minimum_ram), 25e9), "auto")
    assert ok.predicted.peak_ram <= exc.minimum_ram
