"""Regressions found in review: each test failed before its fix."""

from __future__ import annotations

import copy

import pytest
import torch

import vramkit
from vramkit.errors import IrreversibleError, VramkitError
from vramkit.strategies import (
    AttentionBackend,
    ModelOffload,
    Precision,
    PromptCache,
    Resident,
    StoreFP8,
    VaeSlicing,
)
from vramkit.testing import tiny_pipeline
from vramkit.testing.checks import assert_no_hooks
from vramkit.testing.checks import run_tiny as run


def _oom_on(module, call_number):
    calls = []

    def pre(mod, args):
        calls.append(1)
        if len(calls) == call_number:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    module.register_forward_pre_hook(pre)


def test_recovery_into_a_planner_plan_with_resident_steps():
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[VaeSlicing()], vram="2GiB", height=32, width=32)
    controller = pipe._vramkit_state.call_hooks["recovery"]
    planned = vramkit.plan(pipe, vram="1GiB", height=32, width=32, quality="lossless")
    planned.steps = [
        vramkit.PlanStep(Resident(components=("transformer", "vae"), device="cpu"), None, "test", True, True)
    ]
    original_replan = controller.replan
    controller.replan = lambda budget: vramkit.api._per_component(pipe, planned)
    _oom_on(pipe.transformer, 2)
    out = run(pipe, "flux", num_inference_steps=3)
    assert torch.isfinite(out).all()
    assert [s.component for s in vramkit.applied_plan(pipe).steps] == ["transformer", "vae"]
    controller.replan = original_replan
    vramkit.restore(pipe)


def test_after_call_hooks_are_those_of_the_plan_in_force():
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[ModelOffload(device="cpu")])
    state = pipe._vramkit_state
    ran = []

    class Probe:
        def before_call(self, pipe, args, kwargs):
            return None

        def after_call(self, pipe):
            ran.append("new")

    def swap_mid_call(mod, args):
        state.call_hooks.clear()
        state.call_hooks["probe"] = Probe()

    handle = pipe.transformer.register_forward_pre_hook(swap_mid_call)
    run(pipe, "flux")
    handle.remove()
    assert ran == ["new"]


def test_restore_keeps_steps_under_an_irreversible_one_on_the_same_component():
    pipe = tiny_pipeline("flux")
    pipe.transformer.to(torch.bfloat16)
    vramkit.optimize(pipe, strategies=[Precision("fp32", components=("transformer",)), StoreFP8()])
    before = run(pipe, "flux")
    with pytest.raises(IrreversibleError, match="Precision.*StoreFP8|StoreFP8"):
        vramkit.restore(pipe)
    assert torch.equal(run(pipe, "flux"), before)  # still works, in its optimized form


def test_failed_apply_remembers_irreversible_steps_and_leaves_no_state_otherwise():
    pipe = tiny_pipeline("flux")
    with pytest.raises(VramkitError):
        vramkit.optimize(pipe, strategies=[VaeSlicing(), AttentionBackend("no_such_backend")])
    assert "_vramkit_state" not in pipe.__dict__
    with pytest.raises(VramkitError):
        vramkit.optimize(pipe, strategies=[StoreFP8(), AttentionBackend("no_such_backend")])
    with pytest.raises(IrreversibleError, match="StoreFP8"):
        vramkit.restore(pipe)


def test_prompt_cache_delete_with_true_cfg_and_prompt_embeds():
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[PromptCache(release="delete")])
    out = run(pipe, "flux", negative_prompt="blurry", true_cfg_scale=2.0)
    assert torch.isfinite(out).all()
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    again = run(pipe, "flux", negative_prompt="blurry", true_cfg_scale=2.0)
    assert torch.equal(out, again)
    with pytest.raises(VramkitError, match="prompt_embeds"):
        run(pipe, "flux", prompt="never seen before")
    # Encoding a new prompt is impossible now, but passing embeddings still works.
    cache = pipe.encode_prompt
    key, (device, value) = next(iter(cache.entries.items()))
    out2 = run(pipe, "flux", prompt=None, prompt_embeds=value[0], pooled_prompt_embeds=value[1])
    assert torch.isfinite(out2).all()


def test_prompt_cache_yields_to_resident_text_encoders():
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[PromptCache(), Resident(components=("text_encoder_2",), device="cpu")])
    assert pipe.encode_prompt.managed == ["text_encoder"]
    vramkit.restore(pipe)
    assert_no_hooks(pipe, type(pipe))


def test_second_optimize_after_irreversible_plan_does_not_leak_guards():
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[StoreFP8()])
    vramkit.optimize(pipe, strategies=[VaeSlicing()])
    with pytest.raises(IrreversibleError):
        vramkit.restore(pipe)
    assert not getattr(type(pipe.transformer), "_vramkit_recovering", False)
    assert "_vramkit_recovery" not in pipe.transformer.__dict__


def test_copying_an_optimized_pipeline_is_refused_clearly():
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[VaeSlicing()])
    with pytest.raises(VramkitError, match="restore"):
        copy.deepcopy(pipe)
    vramkit.restore(pipe)
    clone = copy.deepcopy(pipe)
    assert torch.equal(run(clone, "flux"), run(pipe, "flux"))
