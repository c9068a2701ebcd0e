"""Where a plan keeps the originals of fp8/int8 weights streamed from RAM (issue #4): in host RAM
while the plan's peak host RAM stays within 1.1x the RAM the pipeline's weights take and within the
budget, else in a file in the offload folder (``BlockStreaming(originals="disk")``), which then costs
no RAM in the prediction; the free disk space of the offload folder, when known, is respected."""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest

from conftest import budget
from vramkit.engine.layout import layout_from_blocks
from vramkit.errors import InvalidBudgetError, PlanInfeasibleError
from vramkit.memory.probe import DeviceProbe
from vramkit.planner import Budget, Request, budget_for, plan_for
from vramkit.planner.search import RAM_BOUND, pipeline_weights

# The package exports the function ``search``, which shadows the module name as an attribute.
search_mod = importlib.import_module("vramkit.planner.search")

GiB = 1024**3
REQ = Request(max_sequence_length=512)


def _transformer_step(plan):
    steps = [s for s in plan.steps if s.strategy.name == "BlockStreaming" and s.component == "transformer"]
    assert len(steps) == 1, plan.explain()
    return steps[0]


def _retained(spec, step) -> int:
    """Bytes of the transformer's originals the engine keeps for this step (all blocks' encoded entries)."""
    s = step.strategy
    stacks, packed, rest = spec.get("transformer").stream.packed[s.storage]
    return layout_from_blocks(stacks, packed, rest, s.resident, s.prefetch, s.storage, None).retained_nbytes


def _plain_ram(plan) -> int:
    ram = {st.ram for st in plan.predicted.stages.values()}
    assert ram == {plan.predicted.peak_ram}
    return plan.predicted.peak_ram


def test_flux_dev_fp8_at_8gib_keeps_its_originals_on_disk(specs):
    spec = specs["flux-dev"]
    weights = pipeline_weights(spec)
    assert 31 * GiB < weights < 32 * GiB  # FLUX.1-dev: 31.4 GiB of weights
    plan = plan_for(spec, REQ, budget(8, 64), "auto")
    step = _transformer_step(plan)
    s = step.strategy
    assert (s.storage, s.host, s.originals) == ("fp8", "ram", "disk"), plan.explain()
    retained = _retained(spec, step)
    assert retained > 20 * GiB
    peak = _plain_ram(plan)
    # The prediction excludes the originals, which would have taken the plan past the bound.
    assert peak <= RAM_BOUND * weights
    assert peak + retained > RAM_BOUND * weights
    assert "bf16 originals" in step.reason and "kept in an offload file for an exact restore" in step.reason
    assert "host RAM holds only the fp8 copy" in step.reason and "1.1x" in step.reason
    assert f"{(peak + retained) / GiB:.2f} GiB" in step.reason


def test_the_pipeline_held_in_ram_counts_in_the_budget_and_originals_still_go_to_disk(specs):
    """As ``plan_pipeline`` sees it: ~31 GiB of the process are the pipeline's weights on the CPU."""
    spec = specs["flux-dev"]
    found = DeviceProbe(
        device="cuda:0",
        name="Test GPU",
        total_vram=24 * GiB,
        free_vram=8 * GiB + 512 * 1024**2,
        ram_total=64 * GiB,
        ram_available=20 * GiB,
        pinned_limit=11 * GiB,
        h2d_bandwidth=25e9,
        bandwidth_source="measured",
        offload_free=500 * GiB,
    )
    held = int(31.4 * GiB)
    b, notes = budget_for(found, extra_ram=held)
    assert b.ram == 20 * GiB + held and b.disk_free == 500 * GiB
    assert any("offload folder" in n and "free" in n for n in notes)
    plan = plan_for(spec, REQ, b, "auto")
    step = _transformer_step(plan)
    assert step.strategy.storage in ("fp8", "int8") and step.strategy.originals == "disk", plan.explain()
    assert plan.predicted.peak_ram <= RAM_BOUND * pipeline_weights(spec)
    assert plan.request["disk_free"] == 500 * GiB


def test_within_the_bound_the_originals_stay_in_ram(specs):
    """At 16 GiB every fp8 block is resident: the plan's RAM with the originals (T5's pinned copy and
    the bf16 originals) is still within 1.1x the weights, so nothing is written."""
    spec = specs["flux-dev"]
    plan = plan_for(spec, REQ, budget(16, 128), "auto")
    step = _transformer_step(plan)
    assert step.strategy.storage == "fp8" and step.strategy.originals == "ram", plan.explain()
    peak = _plain_ram(plan)
    retained = _retained(spec, step)
    assert retained <= peak <= RAM_BOUND * pipeline_weights(spec)
    assert "originals" in step.reason and "stay in host RAM" in step.reason
    assert "originals=" not in step.strategy.describe()


def test_the_bound_decides(specs, monkeypatch):
    """The same 8 GiB plan with a looser bound keeps its originals in RAM (and predicts them there)."""
    spec = specs["flux-dev"]
    tight = plan_for(spec, REQ, budget(8, 64), "auto")
    monkeypatch.setattr(search_mod, "RAM_BOUND", 1.5)
    loose = plan_for(spec, REQ, budget(8, 64), "auto")
    t, lo = _transformer_step(tight), _transformer_step(loose)
    assert (t.strategy.originals, lo.strategy.originals) == ("disk", "ram")
    assert replace(t.strategy, originals="ram") == lo.strategy
    assert loose.predicted.peak_ram - tight.predicted.peak_ram == _retained(spec, t)


def test_over_the_ram_budget_the_originals_go_to_disk_even_within_the_bound(specs):
    spec = specs["flux-dev"]
    plan = plan_for(spec, REQ, budget(16, 24), "auto")
    step = _transformer_step(plan)
    assert step.strategy.storage == "fp8" and step.strategy.originals == "disk", plan.explain()
    assert plan.predicted.peak_ram <= 24 * GiB
    assert "over the 24.00 GiB RAM budget" in step.reason


def test_without_free_disk_the_originals_stay_in_ram_when_they_fit(specs):
    spec = specs["flux-dev"]
    plan = plan_for(spec, REQ, replace(budget(8, 64), disk_free=1 * GiB), "auto")
    step = _transformer_step(plan)
    assert step.strategy.storage == "fp8" and step.strategy.originals == "ram", plan.explain()
    retained = _retained(spec, step)
    assert plan.predicted.peak_ram > RAM_BOUND * pipeline_weights(spec)  # over the bound: nothing better
    assert plan.predicted.peak_ram >= retained
    assert "offload folder has only 1.00 GiB free" in step.reason


def test_without_free_disk_a_plan_that_needs_it_is_rejected_with_the_reason(specs):
    """At 36 GiB of RAM the fp8 plan fits only with its originals on disk; with no disk it is rejected
    (saying why) and a plan that keeps everything in RAM wins."""
    spec = specs["flux-dev"]
    with_disk = plan_for(spec, REQ, replace(budget(8, 36), disk_free=100 * GiB), "auto")
    assert _transformer_step(with_disk).strategy.originals == "disk"
    plan = plan_for(spec, REQ, replace(budget(8, 36), disk_free=0), "auto")
    for step in plan.steps:
        if step.strategy.name == "BlockStreaming":
            assert step.strategy.host == "ram" and step.strategy.originals == "ram"
            assert step.strategy.storage is None, plan.explain()
    assert plan.predicted.peak_ram <= 36 * GiB
    reasons = [r.reason for r in plan.rejected if r.description.startswith("transformer fp8 block-streamed (")]
    assert any(
        "36.00 GiB budget): the originals of the re-encoded weights" in r and "offload folder has only 0 MiB free" in r
        for r in reasons
    ), reasons


def test_disk_streaming_needs_the_free_disk_space_too(specs):
    spec = specs["flux-dev"]
    roomy = plan_for(spec, REQ, replace(budget(8, 8), disk_free=200 * GiB), "lossless")
    assert any(s.strategy.name == "BlockStreaming" and s.strategy.host == "disk" for s in roomy.steps)
    with pytest.raises(PlanInfeasibleError, match="8.00 GiB RAM with 1.00 GiB free in the offload folder"):
        plan_for(spec, REQ, replace(budget(8, 8), disk_free=1 * GiB), "lossless")


def test_disk_free_unknown_is_not_checked_and_bad_values_are_refused(specs):
    spec = specs["flux-dev"]
    plan = plan_for(spec, REQ, budget(8, 64), "auto")
    assert plan.request["disk_free"] is None
    for bad in (-1, 1.5, True):
        with pytest.raises(InvalidBudgetError, match="disk_free"):
            plan_for(spec, REQ, replace(budget(8, 64), disk_free=bad), "auto")


def test_a_probe_without_a_gpu_gives_no_disk_figure():
    """Without a GPU the plan is for another machine: this one's disk says nothing about it."""
    cpu = DeviceProbe("cpu", "CPU (no GPU)", 0, 0, 64 * GiB, 48 * GiB, 24 * GiB, 25e9, "assumed", offload_free=5 * GiB)
    b, _ = budget_for(cpu, vram="8GiB")
    assert b.disk_free is None


def test_the_free_disk_is_read_in_the_offload_folder_given(tmp_path, monkeypatch):
    """vramkit.load(offload_folder=...) writes there: that folder's disk bounds the plan, not the
    default folder's."""
    gpu = DeviceProbe("cuda:0", "Test GPU", 24 * GiB, 20 * GiB, 64 * GiB, 48 * GiB, 24 * GiB, 25e9, "assumed",
                      offload_free=5 * GiB)
    b, _ = budget_for(gpu, vram="8GiB")
    assert b.disk_free == 5 * GiB
    asked = []

    def fake_free(folder):  # type: ignore[no-untyped-def]
        asked.append(folder)
        return 123 * GiB

    monkeypatch.setattr("vramkit.planner.offload_free_bytes", fake_free)
    b, notes = budget_for(gpu, vram="8GiB", offload_folder=tmp_path)
    assert b.disk_free == 123 * GiB and asked == [tmp_path]
    assert any(str(tmp_path) in n for n in notes)


@pytest.mark.parametrize(
    "devices",
    [{"cuda:0": 8 * GiB, "cuda:1": 8 * GiB}, {"cuda:0": 6 * GiB, "cuda:1": 6 * GiB}, {"cuda:0": 12 * GiB}],
)
def test_plans_on_one_or_two_gpus_keep_originals_in_ram_only_within_the_bound(specs, devices):
    """On two GPUs T5 streamed on the second device takes host RAM as well: the originals' placement
    counts it (the transformer's own search does not see it)."""
    spec = specs["flux-dev"]
    weights = pipeline_weights(spec)
    b = Budget(
        vram=next(iter(devices.values())),
        ram=64 * GiB,
        pinned=int(0.55 * 64 * GiB),
        bandwidth=25e9,
        devices=tuple(devices.items()) if len(devices) > 1 else (),
    )
    plan = plan_for(spec, Request(1024, 1024), b, "auto")
    step = _transformer_step(plan)
    assert step.strategy.storage in ("fp8", "int8"), plan.explain()
    retained = _retained(spec, step)
    peak = _plain_ram(plan)
    if step.strategy.originals == "ram":
        assert peak <= RAM_BOUND * weights
    else:
        assert peak + retained > RAM_BOUND * weights and peak <= RAM_BOUND * weights
    if len(devices) > 1 and any("T5 block-streamed on" in n for n in plan.notes):
        assert step.strategy.originals == "disk"


def test_a_replan_counts_the_pipelines_own_offload_files_as_free(tmp_path):
    """Re-planning a streamed pipeline (another optimize, OOM recovery) undoes the old plan first,
    which deletes its offload files: their bytes are free for the new plan."""
    import torch

    from vramkit.engine import SyncCopier, enable_block_streaming
    from vramkit.planner import _offload_bytes_held
    from vramkit.testing._components import tiny_transformer

    model = tiny_transformer(0).to(torch.bfloat16)
    modules = {"transformer": model}
    assert _offload_bytes_held(modules, tmp_path) == 0
    s = enable_block_streaming(model, resident=0, storage="fp8", device="cpu", copier=SyncCopier(),
                               originals="disk", offload_folder=tmp_path / "offload")
    try:
        (path,) = (tmp_path / "offload").iterdir()
        size = path.stat().st_size
        assert size > 0
        # Counted on the disk of the folder the new plan writes to (here the same disk).
        assert _offload_bytes_held(modules, tmp_path / "elsewhere" / "not-yet-created") == size
        gpu = DeviceProbe("cuda:0", "Test GPU", 24 * GiB, 20 * GiB, 64 * GiB, 48 * GiB, 24 * GiB, 25e9, "assumed",
                          offload_free=5 * GiB)
        b, notes = budget_for(gpu, vram="8GiB", extra_disk=size)
        assert b.disk_free == 5 * GiB + size
        assert any("the pipeline's own offload files" in n for n in notes)
    finally:
        s.restore()
    assert _offload_bytes_held(modules, tmp_path) == 0


def test_plan_pipeline_passes_the_pipelines_own_offload_files_to_the_budget(tmp_path, monkeypatch):
    import torch

    import vramkit.planner as planner_mod
    from vramkit.engine import SyncCopier, enable_block_streaming
    from vramkit.testing import tiny_pipeline

    pipe = tiny_pipeline("flux")
    pipe.transformer.to(torch.bfloat16)
    s = enable_block_streaming(pipe.transformer, resident=0, storage="fp8", device="cpu", copier=SyncCopier(),
                               originals="disk", offload_folder=tmp_path)
    seen: list[int] = []
    real = planner_mod.budget_for

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs.get("extra_disk", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(planner_mod, "budget_for", spy)
    try:
        (path,) = tmp_path.iterdir()
        planner_mod.plan_pipeline(pipe, vram="8GiB", offload_folder=tmp_path)
        assert seen == [path.stat().st_size] and seen[0] > 0
    finally:
        s.restore()
