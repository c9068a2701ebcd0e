"""Planner rules checked on the tiny fp32 pipelines, end to end through optimize."""

from __future__ import annotations

import torch

import vramkit
from vramkit.testing import tiny_pipeline
from vramkit.testing.checks import run_tiny as run


def test_tiny_fp32_pipeline_stays_resident_rather_than_sequential():
    # Sequential offload pays compute in the loaded dtype too: it must not look faster than resident.
    pipe = tiny_pipeline("flux")
    plan = vramkit.plan(pipe, vram="8GiB", height=32, width=32, quality="lossless")
    names = {s.strategy.name for s in plan.steps}
    assert "SequentialOffload" not in names and "Resident" in names


def test_planned_bf16_cast_covers_every_component_and_runs():
    # A bf16 transformer beside fp32 text encoders fails with a dtype mismatch inside the pipeline.
    pipe = tiny_pipeline("flux")
    plan = vramkit.optimize(pipe, vram="8GiB", height=32, width=32, quality="auto")
    cast = [s.component for s in plan.steps if s.strategy.name == "Precision"]
    assert set(cast) == {"text_encoder", "text_encoder_2", "transformer", "vae"}  # auto casts fp32 to bf16
    out = run(pipe, "flux")
    assert torch.isfinite(out.float()).all()
