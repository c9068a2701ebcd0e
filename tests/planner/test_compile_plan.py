"""``compile=True``: the plan compiles the transformer (and ControlNet) in the mode the placement
allows and says why; never with quality='lossless'; never under sequential offload."""

from __future__ import annotations

import json

import pytest

from conftest import budget
from vramkit.cli import main
from vramkit.errors import InvalidRequestError
from vramkit.plan import Plan
from vramkit.planner import Request, plan_for


def _compile_steps(plan: Plan) -> list:
    return [s for s in plan.steps if s.name == "Compile"]


def _placement(plan: Plan, component: str) -> str:
    for s in plan.steps:
        if s.name in ("BlockStreaming", "Resident", "ModelOffload") and component in (s.strategy.components or ()):
            return s.name
    raise AssertionError(f"{component} not placed")


def test_streamed_plan_compiles_in_default_mode_and_says_why(specs):
    plan = plan_for(specs["flux-dev"], Request(1024, 1024), budget(8), "auto", compile=True)
    assert _placement(plan, "transformer") == "BlockStreaming"
    (step,) = _compile_steps(plan)
    assert step.component == "transformer"
    assert step.strategy.mode is None and step.strategy.backend == "inductor"
    assert "CUDA-graph modes" in step.reason and "weights move" in step.reason
    assert not step.lossless
    # Compile comes after the placement it compiles beneath.
    names = [s.name for s in plan.steps]
    assert names.index("Compile") > names.index("BlockStreaming")
    assert plan.request["compile"] is True


def test_resident_plan_says_cuda_graph_pools_are_not_budgeted(specs):
    plan = plan_for(specs["flux-dev"], Request(1024, 1024), budget(60), "auto", compile=True)
    assert _placement(plan, "transformer") == "Resident"
    (step,) = _compile_steps(plan)
    assert "resident" in step.reason and "memory pools" in step.reason


def test_controlnet_is_compiled_too(specs):
    plan = plan_for(specs["flux-dev+controlnet-union"], Request(1024, 1024), budget(16), "auto", compile=True)
    assert {s.component for s in _compile_steps(plan)} == {"transformer", "controlnet"}


def test_without_compile_no_step(specs):
    plan = plan_for(specs["flux-dev"], Request(1024, 1024), budget(8), "auto")
    assert not _compile_steps(plan)
    assert "compile" not in plan.request


def test_lossless_and_compile_is_refused(specs):
    with pytest.raises(InvalidRequestError, match="bit-identical"):
        plan_for(specs["flux-dev"], Request(1024, 1024), budget(8), "lossless", compile=True)


def test_sequential_offload_is_not_compiled(specs):
    plan = plan_for(specs["flux-dev"], Request(1024, 1024), budget(3), "auto", compile=True)
    assert [s.name for s in plan.steps] == ["SequentialOffload"]
    assert any("sequential offload" in n for n in plan.notes)


def test_plan_with_compile_round_trips(specs):
    plan = plan_for(specs["flux-dev"], Request(1024, 1024), budget(8), "auto", compile=True)
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.to_dict() == plan.to_dict()


def test_cli_compile_flag(capsys):
    assert main(["plan", "--model", "flux-dev", "--vram", "8GiB", "--compile", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    steps = data["plan"]["steps"] if "plan" in data else data["steps"]
    assert any(s["strategy"] == "Compile" for s in steps)


def test_no_gpu_plan_notes_that_nothing_compiles():
    import vramkit
    from vramkit.testing import tiny_pipeline

    plan = vramkit.plan(tiny_pipeline("flux"), device="cpu", compile=True)
    assert not plan.steps
    assert any("nothing compiled" in n for n in plan.notes)


def test_sequential_plan_without_controlnet_names_only_the_transformer(specs):
    plan = plan_for(specs["flux-dev"], Request(1024, 1024), budget(3), "auto", compile=True)
    notes = [n for n in plan.notes if n.startswith("compile:")]
    assert len(notes) == 1 and "transformer" in notes[0]


def test_lossless_refused_before_any_search(specs):
    # Even where nothing fits (1 GiB), the lossless+compile conflict is what the user hears first.
    with pytest.raises(InvalidRequestError, match="bit-identical"):
        plan_for(specs["flux-dev"], Request(1024, 1024), budget(1), "lossless", compile=True)
