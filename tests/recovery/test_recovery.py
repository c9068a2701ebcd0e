"""Recovery from an out-of-memory error injected into a component at text encoding, at denoising
step 3 and at VAE decode: the call returns the image an uninterrupted run of the recovered plan
gives, and the event record says what happened. recover=False leaves the error to the caller."""

from __future__ import annotations

import pytest
import torch

import vramkit
from vramkit.errors import OutOfMemoryError
from vramkit.testing import tiny_pipeline
from vramkit.testing.checks import assert_no_hooks
from vramkit.testing.checks import run_tiny as run

REQUEST = dict(vram="2GiB", height=32, width=32, quality="lossless")
STEPS = dict(num_inference_steps=4)


def inject_oom(module: torch.nn.Module, at: set[int] | None) -> list[int]:
    """Raise CUDA's out-of-memory error on the given calls of ``module`` (every call if ``at`` is None)."""
    calls: list[int] = []

    def pre_hook(mod, args):
        calls.append(len(calls) + 1)
        if at is None or len(calls) in at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")

    module.register_forward_pre_hook(pre_hook)
    return calls


def _target(pipe, where: str) -> torch.nn.Module:
    return {"text_encoding": pipe.text_encoder_2, "denoising_step": pipe.transformer, "vae_decode": pipe.vae.decoder}[
        where
    ]


@pytest.mark.parametrize(
    "where,calls", [("text_encoding", {1}), ("denoising_step", {3}), ("vae_decode", {1})]
)
@pytest.mark.parametrize("kind", ["flux", "controlnet-union"])
def test_injected_oom_is_recovered(kind, where, calls):
    pipe = tiny_pipeline(kind)
    vramkit.optimize(pipe, **REQUEST)
    seen = inject_oom(_target(pipe, where), calls)
    out = run(pipe, kind, **STEPS)
    assert len(seen) >= max(calls) + 1, "the failed call was not repeated"
    events = pipe.vramkit_events
    assert len(events) == 1
    event = events[0]
    assert event["stage"] == where
    assert event["event"] == "recovered_out_of_memory" and "injected" in event["error"]
    assert event["budget"] < vramkit.memory.budget.parse_budget("2GiB")

    # An uninterrupted run of the recovered plan, on a fresh pipeline, gives the same image.
    recovered = vramkit.applied_plan(pipe)
    fresh = tiny_pipeline(kind)
    vramkit.optimize(fresh, strategies=[s.strategy for s in recovered.steps], recover=False)
    expected = run(fresh, kind, **STEPS)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert torch.equal(out, expected)
    # And (lossless plans) the image of the unoptimized pipeline.
    assert torch.equal(out, run(tiny_pipeline(kind), kind, **STEPS))
    built = type(tiny_pipeline(kind))
    vramkit.restore(pipe)
    assert type(pipe) is built


def test_recover_false_leaves_the_error_to_the_caller_and_the_pipeline_works():
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, recover=False, **REQUEST)
    handle_calls = inject_oom(pipe.transformer, {2})
    with pytest.raises(torch.OutOfMemoryError):
        run(pipe, "flux", **STEPS)
    assert handle_calls
    out = run(pipe, "flux", **STEPS)  # the hook only fails the 2nd call; this call works
    assert torch.isfinite(out).all()
    assert "vramkit_events" not in pipe.__dict__


def test_retries_are_bounded_then_a_clear_error():
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, **REQUEST)
    inject_oom(pipe.transformer, None)
    with pytest.raises(OutOfMemoryError, match="denoising_step") as info:
        run(pipe, "flux", **STEPS)
    assert info.value.stage == "denoising_step"
    assert len(pipe.vramkit_events) == 3


def test_optimize_on_cpu_installs_recovery_and_restore_removes_it():
    pipe = tiny_pipeline("flux")
    built = type(pipe)
    plan = vramkit.optimize(pipe)
    assert plan.steps == []  # no GPU here: no GPU steps
    # Guards exist only during a pipeline call: outside one, every component has its own class.
    assert not getattr(type(pipe.transformer), "_vramkit_recovering", False)
    guarded = []
    pipe.transformer.register_forward_pre_hook(
        lambda mod, args: guarded.append(getattr(type(mod), "_vramkit_recovering", False))
    )
    inject_oom(pipe.vae.decoder, {1})
    run(pipe, "flux")
    assert guarded and all(guarded)
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    assert not getattr(type(pipe.transformer), "_vramkit_recovering", False)
    pipe.transformer._forward_pre_hooks.clear()
    assert pipe.vramkit_events and pipe.vramkit_events[0]["stage"] == "vae_decode"
    vramkit.restore(pipe)
    pipe.vae.decoder._forward_pre_hooks.clear()
    assert_no_hooks(pipe, built)


def test_from_pipe_works_on_an_optimized_pipeline():
    from diffusers import FluxImg2ImgPipeline

    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, **REQUEST)
    run(pipe, "flux")
    other = FluxImg2ImgPipeline.from_pipe(pipe)
    assert other.transformer is pipe.transformer
    vramkit.restore(pipe)
