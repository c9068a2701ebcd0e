"""What the planner returns: JSON round trip, reasons, rejected alternatives, request checks,
budgets from a probe, and plans the strategy machinery accepts."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from vramkit.errors import InvalidBudgetError, InvalidRequestError, PlanInfeasibleError
from vramkit.memory.probe import DeviceProbe
from vramkit.plan import Plan
from vramkit.planner import Budget, Request, budget_for, default_vram_margin, plan_for

GiB = 1024**3


def _budget(vram_gib: float, ram_gib: float = 64, bandwidth: float = 25e9) -> Budget:
    ram = int(ram_gib * GiB)
    return Budget(vram=int(vram_gib * GiB), ram=ram, pinned=int(0.55 * ram), bandwidth=bandwidth)


def _probe(free_gib: float, total_gib: float = 24, device: str = "cuda:0") -> DeviceProbe:
    return DeviceProbe(
        device=device,
        name="Test GPU",
        total_vram=int(total_gib * GiB),
        free_vram=int(free_gib * GiB),
        ram_total=64 * GiB,
        ram_available=48 * GiB,
        pinned_limit=24 * GiB,
        h2d_bandwidth=25e9,
        bandwidth_source="measured",
    )


CASES = [
    ("flux-dev", 8, {}, "auto"),
    ("flux-dev", 8, {}, "lossless"),
    ("flux-dev", 12, {"batch_size": 4, "height": 1360 // 16 * 16, "width": 768}, "auto"),
    ("flux-dev", 24, {"true_cfg": True}, "auto"),
    ("flux-schnell", 6, {"num_inference_steps": 4}, "auto"),
    ("flux-fill", 10, {}, "lossless"),
    ("flux-kontext", 16, {}, "auto"),
    ("flux-dev+controlnet-union", 8, {}, "auto"),
    ("flux-dev+controlnet-union", 12, {}, "lossless"),
    ("flux-dev", 3, {}, "auto"),
]


@pytest.mark.parametrize(("model", "vram", "req", "quality"), CASES)
def test_plan_json_round_trip_is_exact(specs, model, vram, req, quality):
    spec = specs[model]
    fields = {"max_sequence_length": spec.default_max_sequence_length, **req}
    plan = plan_for(spec, Request(**fields), _budget(vram), quality)
    d = plan.to_dict()
    assert Plan.from_dict(d).to_dict() == d
    assert Plan.from_json(plan.to_json()).to_dict() == d
    json.dumps(d)  # JSON-safe
    assert d["request"]["height"] == fields.get("height", 1024)
    assert d["request"]["vram_budget"] == int(vram * GiB)
    assert plan.rejected, "the alternatives considered are listed"
    for r in plan.rejected:
        assert r.reason
    text = plan.explain()
    assert "predicted" in text and "why:" in text or not plan.steps


@pytest.mark.parametrize(("model", "vram", "req", "quality"), CASES)
def test_plans_pass_the_conflict_checks(specs, model, vram, req, quality):
    from vramkit import api

    spec = specs[model]
    fields = {"max_sequence_length": spec.default_max_sequence_length, **req}
    plan = plan_for(spec, Request(**fields), _budget(vram), quality)
    api._check_conflicts(list(plan.steps), list(spec.components))
    orders = [s.strategy.order for s in plan.steps]
    assert orders == sorted(orders)


def test_8gib_flux_dev_streams_the_transformer_and_t5(specs):
    plan = plan_for(specs["flux-dev"], Request(), _budget(8), "auto")
    streamed = {s.component for s in plan.steps if s.strategy.name == "BlockStreaming"}
    # CLIP too: with fp8 storage the text encoding binds at 8 GiB, and parking both encoders between
    # prompts (CLIP "streamed" with every layer resident) leaves it only the encoder that runs.
    assert streamed == {"transformer", "text_encoder_2", "text_encoder"}
    for te in ("text_encoder", "text_encoder_2"):
        s = next(st.strategy for st in plan.steps if st.component == te)
        assert s.park_after_forward and s.park_rest
    tr = next(s for s in plan.steps if s.component == "transformer")
    # Streamed by parts (FLUX.1-dev: 247 parts in 57 blocks): the ring holds parts, not blocks.
    assert tr.strategy.unit == "part"
    assert 0 < tr.strategy.resident < 247
    assert "GB/s" in tr.reason and "compute" in tr.reason and "by parts" in tr.reason
    p = plan.predicted
    # Uses the budget it was given: the allocated peak plus the allocator reserve (5% + 384 MiB) fills it.
    assert p.peak_vram * 1.05 + 384 * 2**20 > 0.95 * 8 * GiB
    # Below the 23.8 GB / 25 GB/s = 0.95 s that streaming everything every step would cost.
    assert p.seconds_per_step < 0.6


def test_lossless_plan_is_bit_identical(specs):
    plan = plan_for(specs["flux-dev"], Request(), _budget(8), "lossless")
    assert plan.lossless
    assert all(s.lossless for s in plan.steps)
    assert "bit-identical" in plan.explain()


def test_faster_bus_gives_faster_streaming(specs):
    slow = plan_for(specs["flux-dev"], Request(), _budget(10, bandwidth=12e9), "lossless")
    fast = plan_for(specs["flux-dev"], Request(), _budget(10, bandwidth=55e9), "lossless")
    assert fast.predicted.seconds_per_step < slow.predicted.seconds_per_step


def test_true_cfg_doubles_the_step(specs):
    a = plan_for(specs["flux-dev"], Request(), _budget(80), "auto")
    b = plan_for(specs["flux-dev"], Request(true_cfg=True), _budget(80), "auto")
    assert b.predicted.seconds_per_step == pytest.approx(2 * a.predicted.seconds_per_step)


def test_batch_uses_vae_slicing_when_tight(specs):
    spec = specs["flux-dev"]
    req = Request(height=2048, width=2048, batch_size=4)
    plan = plan_for(spec, req, _budget(48), "lossless")
    assert "VaeSlicing" in {s.strategy.name for s in plan.steps}


def test_materialized_attention_gets_sliced(specs):
    spec = specs["flux-dev"]
    b = replace(_budget(40), device="mps")
    plan = plan_for(spec, Request(height=2048, width=2048), b, "lossless")
    assert "AttentionSlicing" in {s.strategy.name for s in plan.steps}
    assert plan.predicted.peak_vram <= b.vram


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"height": 1000}, "1008"),
        ({"width": 1020, "height": 1024}, "1024x1024"),
        ({"height": 0}, "positive"),
        ({"height": -16}, "positive"),
        ({"width": 8208}, "8192"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"max_sequence_length": 1000}, "max_sequence_length"),
    ],
)
def test_bad_requests(kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        Request(**kwargs)


def test_bad_quality_and_budget(specs):
    with pytest.raises(InvalidRequestError, match="quality"):
        plan_for(specs["flux-dev"], Request(), _budget(8), "best")
    with pytest.raises(InvalidBudgetError):
        plan_for(specs["flux-dev"], Request(), Budget(0, GiB, GiB, 1e9))
    with pytest.raises(InvalidBudgetError):
        plan_for(specs["flux-dev"], Request(), "8GiB")  # type: ignore[arg-type]


def test_margin_is_a_share_of_what_is_free_not_of_the_device():
    # 8 GiB free on a 140 GiB card: the margin must not eat half the budget (it did, on an H200).
    b, _ = budget_for(_probe(free_gib=8, total_gib=140))
    assert b.vram == 8 * GiB - 512 * 2**20


def test_request_from_mapping_uses_model_defaults(specs):
    plan = plan_for(specs["flux-schnell"], {"height": 512, "width": 512}, _budget(80))
    assert plan.request["max_sequence_length"] == 256
    assert plan.request["num_inference_steps"] == 4


def test_budget_from_probe():
    found = _probe(free_gib=20, total_gib=24)
    b, notes = budget_for(found)
    assert b.vram == 20 * GiB - default_vram_margin(20 * GiB)
    assert b.ram == 48 * GiB and b.pinned == int(0.55 * 48 * GiB)
    assert b.bandwidth == 25e9 and b.bandwidth_source == "measured"
    assert any("margin" in n for n in notes)
    b2, _ = budget_for(found, vram="50%", ram="32GiB", bandwidth="12GB/s")
    assert b2.vram == 12 * GiB and b2.ram == 32 * GiB and b2.bandwidth == 12e9
    with pytest.raises(InvalidBudgetError):
        budget_for(_probe(free_gib=0.1))


def test_plan_from_probe(specs):
    plan = plan_for(specs["flux-dev"], Request(), _probe(free_gib=23, total_gib=24))
    assert plan.predicted.peak_vram <= 23 * GiB - default_vram_margin(23 * GiB)
    assert any("margin" in n for n in plan.notes)


def test_no_gpu_probe_gives_an_empty_plan(specs):
    cpu = DeviceProbe("cpu", "CPU (no GPU)", 0, 0, 64 * GiB, 48 * GiB, 24 * GiB, 25e9, "assumed")
    plan = plan_for(specs["flux-dev"], Request(), cpu)
    assert plan.steps == [] and plan.predicted is None
    assert "no GPU" in plan.notes[0]


def test_infeasible_message_is_helpful(specs):
    with pytest.raises(PlanInfeasibleError) as info:
        plan_for(specs["flux-dev"], Request(height=2048, width=2048), _budget(2), "lossless")
    msg = str(info.value)
    assert "smallest plan needs" in msg and "quality='auto'" in msg


def test_default_budget_counts_what_the_pipeline_already_holds():
    found = _probe(free_gib=4, total_gib=24)
    b, notes = budget_for(found, extra_vram=10 * GiB)
    assert b.vram == 14 * GiB - default_vram_margin(14 * GiB)
    assert any("the pipeline holds" in n for n in notes)
    b2, _ = budget_for(found, vram="8GiB", extra_vram=10 * GiB)  # an explicit budget is the budget
    assert b2.vram == 8 * GiB


@pytest.mark.parametrize("model", ["flux-dev", "flux-dev+controlnet-union"])
def test_every_family_yields_steps_the_machinery_accepts(specs, model):
    """Not only the winners: the best candidate of every family builds steps without conflicts."""
    import importlib

    from vramkit import api
    from vramkit.memory.calibration import Calibration

    search = importlib.import_module("vramkit.planner.search")
    spec = specs[model]
    for vram in (6, 14, 60):
        for quality in ("auto", "lossless"):
            ctx = search._Ctx(spec, Request(batch_size=2), _budget(vram), quality, Calibration(), True)
            res = search._run(ctx)
            assert res.by_family
            for cand in res.by_family.values():
                steps = search._steps(res, cand)
                api._check_conflicts(steps, list(spec.components))
                assert all(s.reason for s in steps)
