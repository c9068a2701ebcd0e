"""plan_pipeline on real (tiny, offline) diffusers pipelines: plans without changing anything."""

from __future__ import annotations

import pytest
import torch

from vramkit.errors import InvalidBudgetError, InvalidRequestError, UnsupportedPipelineError
from vramkit.plan import Plan
from vramkit.planner import plan_pipeline, spec_from_pipeline

try:
    from vramkit.testing import tiny_pipeline
except ImportError:  # pragma: no cover - the tiny pipelines are written elsewhere
    tiny_pipeline = None

pytestmark = pytest.mark.skipif(tiny_pipeline is None, reason="vramkit.testing.tiny_pipeline not available")

KINDS = ("flux", "fill", "kontext", "controlnet-union", "multi-controlnet", "img2img")


def _state(pipe):
    out = {}
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            for k, v in comp.state_dict().items():
                out[f"{name}.{k}"] = (v.clone(), v.device, v.dtype, v.data_ptr())
            out[f"{name}.<training>"] = comp.training
            out[f"{name}.<hooks>"] = hasattr(comp, "_hf_hook") or hasattr(comp, "_diffusers_hook")
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], tuple):
            assert torch.equal(a[k][0], b[k][0]) and a[k][1:] == b[k][1:], k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("kind", KINDS)
def test_plan_leaves_the_pipeline_unchanged(kind):
    pipe = tiny_pipeline(kind)
    before = _state(pipe)
    encode_prompt = pipe.__dict__.get("encode_prompt")
    plan = plan_pipeline(pipe, vram="8GiB", height=64, width=64)
    plan2 = plan_pipeline(
        pipe, vram=700 * 1024**2, ram="16GiB", height=128, width=128, batch_size=2, quality="lossless"
    )
    _same(before, _state(pipe))
    assert pipe.__dict__.get("encode_prompt") is encode_prompt
    for p in (plan, plan2):
        assert isinstance(p, Plan) and p.predicted is not None
        assert Plan.from_dict(p.to_dict()).to_dict() == p.to_dict()
    assert plan.predicted.peak_vram <= 8 * 1024**3
    assert plan2.lossless and plan2.predicted.peak_vram <= 700 * 1024**2
    assert plan.request["kind"] in ("flux", "fill", "kontext", "controlnet", "img2img")


def test_spec_reads_the_components():
    pipe = tiny_pipeline("controlnet-union")
    spec = spec_from_pipeline(pipe)
    assert spec.kind == "controlnet"
    assert {"transformer", "controlnet", "text_encoder", "text_encoder_2", "vae"} <= set(spec.components)
    t = spec.sizes("transformer")
    assert t.dtype == "fp32"
    assert t.params == sum(p.numel() for p in pipe.transformer.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_no_gpu_without_vram_gives_an_empty_plan():
    pipe = tiny_pipeline("flux")
    plan = plan_pipeline(pipe)
    assert plan.steps == [] and plan.predicted is None
    assert any("no GPU" in n for n in plan.notes)


def test_bad_input():
    pipe = tiny_pipeline("flux")
    with pytest.raises(InvalidRequestError, match="nearest valid size"):
        plan_pipeline(pipe, vram="8GiB", height=100, width=64)
    with pytest.raises(InvalidBudgetError):
        plan_pipeline(pipe, vram="0GiB")
    with pytest.raises(InvalidBudgetError):
        plan_pipeline(pipe, vram="lots")
    with pytest.raises(InvalidRequestError):
        plan_pipeline(pipe, vram="8GiB", batch_size=0)
    with pytest.raises(InvalidRequestError, match="quality"):
        plan_pipeline(pipe, vram="8GiB", quality="fast")
    with pytest.raises(UnsupportedPipelineError):
        plan_pipeline(object(), vram="8GiB")


def test_api_plan_is_wired():
    import vramkit

    pipe = tiny_pipeline("flux")
    plan = vramkit.plan(pipe, vram="4GiB", height=64, width=64, num_inference_steps=2, bandwidth="10GB/s")
    assert plan.request["num_inference_steps"] == 2
    assert plan.request["bandwidth"] == 10e9
