"""Planning across several GPUs (per-device budgets) on the full-size architectures (meta device).

- FLUX.1-dev at 1024^2 with fp8 storage on 2 x 8 or 2 x 12 GiB (25 GB/s) puts the transformer and
  the text encoders on different devices, fits every device, and predicts a faster image (and no
  slower step) than the best one-device plan of the same budget;
- no device's predicted peak is ever above its budget (property over per-device budgets);
- the Plan JSON round trip stays exact; bad mappings raise InvalidBudgetError.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vramkit.cli import main
from vramkit.errors import InvalidBudgetError, PlanInfeasibleError
from vramkit.memory.budget import parse_device_budgets
from vramkit.plan import Plan
from vramkit.planner import Budget, Request, plan_for

GiB = 1024**3


def _budget(devices: dict[str, int], ram: int = 64 * GiB, bandwidth: float = 25e9) -> Budget:
    first = next(iter(devices.values()))
    return Budget(vram=first, ram=ram, pinned=int(0.55 * ram), bandwidth=bandwidth, devices=tuple(devices.items()))


def _device_of(plan: Plan, component: str) -> str | None:
    for step in plan.steps:
        s = step.strategy
        if s.name in ("Resident", "BlockStreaming") and component in (s.components or ()):
            return s.device
    return None


@pytest.mark.parametrize("vram", [8, 12])
def test_two_gpus_split_beats_one_gpu(specs, vram):
    spec = specs["flux-dev"]
    req = Request(1024, 1024)
    quality = "auto"
    two = plan_for(spec, req, _budget({"cuda:0": vram * GiB, "cuda:1": vram * GiB}), quality)
    one_budget = Budget(vram=vram * GiB, ram=64 * GiB, pinned=int(0.55 * 64 * GiB), bandwidth=25e9)
    one = plan_for(spec, req, one_budget, quality)
    t_dev = _device_of(two, "transformer")
    te_dev = _device_of(two, "text_encoder")
    assert t_dev is not None and te_dev is not None and t_dev != te_dev
    assert {t_dev, te_dev} == {"cuda:0", "cuda:1"}
    p = two.predicted
    assert p is not None
    by_device = p.peak_vram_by_device
    assert set(by_device) == {"cuda:0", "cuda:1"}
    assert all(v <= 12 * GiB for v in by_device.values())
    for stage in p.stages.values():
        assert set(stage.devices) == {"cuda:0", "cuda:1"}
        assert stage.vram == max(stage.devices.values())
    assert one.predicted is not None
    # Per step the split is at least as fast (with fp8 storage one 12 GiB GPU whose text encoders
    # are parked between prompts already holds the whole transformer); per image it is faster.
    assert p.seconds_per_step <= one.predicted.seconds_per_step
    assert p.seconds_per_image < one.predicted.seconds_per_image
    # The one-device plans were candidates and say why they lost.
    lost = [r for r in two.rejected if r.description.startswith("one GPU (cuda:0)")]
    assert lost and any(r.reason.startswith("slower by") for r in lost)
    # Every component is placed exactly once, on a named device.
    placed = [c for s in two.steps if s.strategy.name in ("Resident", "BlockStreaming") for c in s.strategy.components]
    assert sorted(placed) == sorted(spec.components)
    assert all(s.strategy.device in ("cuda:0", "cuda:1") for s in two.steps if s.strategy.name == "Resident")
    assert two.request["vram_budgets"] == {"cuda:0": vram * GiB, "cuda:1": vram * GiB}
    assert "cuda:1" in two.explain() and "peak VRAM per device" in two.explain()


def test_json_round_trip_is_exact(specs):
    plan = plan_for(specs["flux-dev"], Request(1024, 1024), _budget({"cuda:0": 12 * GiB, "cuda:1": 12 * GiB}))
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again.to_json() == text
    assert again.steps == plan.steps
    assert again.predicted == plan.predicted
    assert json.loads(text)["predicted"]["stages"]["denoising_step"]["devices"]


def test_one_device_plan_json_has_no_devices_field(specs):
    plan = plan_for(specs["flux-dev"], Request(1024, 1024), Budget(12 * GiB, 64 * GiB, 32 * GiB, 25e9))
    assert "devices" not in plan.to_json() or '"devices"' not in json.dumps(plan.to_dict()["predicted"])
    assert all(s.strategy.to_dict().get("device") is None for s in plan.steps)


def test_a_larger_second_device_can_take_everything(specs):
    """When one device alone is best (here cuda:1 holds the whole pipeline), the plan is a one-device
    plan on that device, with the split plans among the rejected."""
    plan = plan_for(specs["flux-dev"], Request(1024, 1024), _budget({"cuda:0": 4 * GiB, "cuda:1": 80 * GiB}))
    assert {_device_of(plan, c) for c in ("transformer", "text_encoder", "vae")} == {"cuda:1"}
    assert any(r.description.startswith("two GPUs") for r in plan.rejected)


gib = st.integers(min_value=3, max_value=40).map(lambda g: g * GiB)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=gib, b=gib, side=st.sampled_from([512, 1024, 1360]), quality=st.sampled_from(["auto", "lossless"]))
def test_never_above_any_device_budget(specs, a, b, side, quality):
    budgets = {"cuda:0": a, "cuda:1": b}
    try:
        plan = plan_for(specs["flux-dev"], Request(side, side), _budget(budgets), quality)
    except PlanInfeasibleError:
        return
    p = plan.predicted
    assert p is not None
    for stage in p.stages.values():
        for dev, v in stage.devices.items():
            assert v <= budgets[dev], (dev, v, budgets[dev])
        assert stage.ram <= 64 * GiB
    if quality == "lossless":
        assert plan.lossless


@pytest.mark.parametrize(
    ("mapping", "match"),
    [
        ({}, "names no device"),
        ({"cuda:0": "12GiB", 0: "8GiB"}, "twice"),
        ({"cuda:0": "12GiB", torch.device("cuda", 0): "8GiB"}, "twice"),
        ({"cpu": "12GiB"}, "CUDA devices"),
        ({"cuda": "12GiB"}, "no device index"),
        ({"cuda:0": 0}, "more than zero"),
        ({"cuda:0": "-3GiB"}, "more than zero"),
        ({"cuda:0": "lots"}, "could not parse"),
        ({"cuda:5": "12GiB"}, "has 2 CUDA device"),
        ({"cuda:0": "50%"}, "percentage"),
        ({True: "1GiB"}, "not a device"),
    ],
)
def test_bad_mappings_raise_clear_errors(mapping, match):
    with pytest.raises(InvalidBudgetError, match=match):
        parse_device_budgets(mapping, visible=2)


def test_mapping_keys_are_normalized():
    got = parse_device_budgets(
        {0: "12GiB", torch.device("cuda", 1): 8 * GiB, "cuda:2": "50%"}, totals={"cuda:2": 10 * GiB}
    )
    assert got == {"cuda:0": 12 * GiB, "cuda:1": 8 * GiB, "cuda:2": 5 * GiB}
    with pytest.raises(InvalidBudgetError, match="more than the device"):
        parse_device_budgets({"cuda:0": "20GiB"}, totals={"cuda:0": 10 * GiB})


def test_budget_devices_are_checked(specs):
    bad = Budget(12 * GiB, 64 * GiB, 32 * GiB, 25e9, devices=(("cuda:0", 12 * GiB), ("cuda:0", 4 * GiB)))
    with pytest.raises(InvalidBudgetError, match="twice"):
        plan_for(specs["flux-dev"], Request(1024, 1024), bad)
    bad = Budget(12 * GiB, 64 * GiB, 32 * GiB, 25e9, devices=(("cuda:0", 12 * GiB), ("cuda:1", 0)))
    with pytest.raises(InvalidBudgetError, match="positive"):
        plan_for(specs["flux-dev"], Request(1024, 1024), bad)


@pytest.mark.parametrize(
    "argv",
    [
        ["--vram", "cuda:0=12GiB,cuda:1=12GiB"],
        ["--vram", "cuda:0=12GiB", "--vram", "cuda:1=12GiB"],
        ["--devices", "2", "--vram", "12GiB"],
    ],
)
def test_cli_per_device_vram(capsys, argv):
    rc = main(["plan", "--model", "flux-dev", "--ram", "64GiB", "--bandwidth", "25GB/s", "--json", *argv])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["request"]["vram_budgets"] == {"cuda:0": 12 * GiB, "cuda:1": 12 * GiB}
    stages = data["plan"]["predicted"]["stages"]
    assert all(set(s["devices"]) == {"cuda:0", "cuda:1"} for s in stages.values())


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--vram", "12GiB", "--vram", "8GiB"], "without devices"),
        (["--vram", "12GiB,cuda:1=8GiB"], "mixes"),
        (["--devices", "2"], "needs --vram"),
        (["--vram", "cuda:0=1GiB", "--vram", "0=2GiB"], "twice"),
    ],
)
def test_cli_bad_per_device_vram(capsys, argv, match):
    rc = main(["plan", "--model", "flux-dev", "--ram", "64GiB", "--bandwidth", "25GB/s", *argv])
    assert rc == 2
    assert match in capsys.readouterr().err


def test_split_must_gain_enough_over_one_device(specs):
    """At 55 GB/s the fp8 plans are compute-bound: the best split is predicted under 5 % faster than
    one device, and the 2 x H200 run measured it slower (0.187 vs 0.171 s/step), so one device is
    kept and the plan says why. Lossless (copy-bound) split 1.14x faster on 2 x H200, against the
    one-device plan of the time, whose text encoders stayed on the GPU through the steps; with both
    parked between prompts one device keeps nearly as much of the transformer resident (the split
    now gains only the VAE's 0.17 GB and T5's copies, under 5 %), so it stays on one device too."""
    spec = specs["flux-dev"]
    req = Request(1024, 1024)
    budget = _budget({"cuda:0": 12 * GiB, "cuda:1": 12 * GiB}, ram=120 * GiB, bandwidth=55e9)
    auto = plan_for(spec, req, budget, "auto")
    assert {_device_of(auto, "transformer"), _device_of(auto, "text_encoder")} == {"cuda:0"}
    assert any("not worth its cross-device transfers" in n for n in auto.notes)
    assert any("a split across devices must gain" in r.reason for r in auto.rejected)
    lossless = plan_for(spec, req, budget, "lossless")
    assert _device_of(lossless, "transformer") == _device_of(lossless, "text_encoder_2") == "cuda:0"
    assert any("not worth its cross-device transfers" in n for n in lossless.notes)
    assert any(s.strategy.name == "BlockStreaming" and s.strategy.park_rest for s in lossless.steps)
