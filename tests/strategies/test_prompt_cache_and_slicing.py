"""PromptCache runs no text encoder on a cached prompt; AttentionSlicing really chunks queries."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vramkit
from vramkit.errors import VramkitError
from vramkit.strategies import AttentionSlicing, PromptCache, VaeTiling
from vramkit.testing import TINY_KINDS, tiny_pipeline
from vramkit.testing.checks import assert_no_hooks
from vramkit.testing.checks import run_tiny as run


def _count_encoder_calls(pipe) -> list[str]:
    calls: list[str] = []
    for name in ("text_encoder", "text_encoder_2"):
        getattr(pipe, name).register_forward_pre_hook(lambda *_, n=name: calls.append(n))
    return calls


@pytest.mark.parametrize("kind", ["flux", "fill", "controlnet-union"])
def test_second_call_with_same_prompt_runs_no_text_encoder(kind, reference_outputs):
    pipe = tiny_pipeline(kind)
    calls = _count_encoder_calls(pipe)
    vramkit.optimize(pipe, strategies=[PromptCache(release="cpu")])
    first = run(pipe, kind)
    assert calls, "the first call must encode"
    calls.clear()
    second = run(pipe, kind)
    assert calls == [], f"text encoders ran on a cached prompt: {calls}"
    assert torch.equal(first, reference_outputs[kind])
    assert torch.equal(second, reference_outputs[kind])
    cache = pipe.encode_prompt
    assert cache.hits >= 1 and cache.misses >= 1
    # A new prompt encodes again.
    run(pipe, kind, prompt="a different prompt")
    assert calls
    vramkit.restore(pipe)
    assert_no_hooks(pipe, type(pipe))


def test_prompt_cache_delete_drops_encoders_and_explains_new_prompts():
    pipe = tiny_pipeline("flux")
    reference = run(pipe, "flux")
    plan = vramkit.optimize(pipe, strategies=[PromptCache(release="delete")])
    assert not plan.steps[0].reversible
    assert torch.equal(run(pipe, "flux"), reference)
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    assert torch.equal(run(pipe, "flux"), reference)
    with pytest.raises(VramkitError, match="prompt_embeds"):
        run(pipe, "flux", prompt="never seen before")


def test_attention_slicing_chunks_queries(monkeypatch):
    from diffusers.models.transformers import transformer_flux

    pipe = tiny_pipeline("flux")
    reference = run(pipe, "flux", height=128, width=128)
    seen: list[int] = []
    original = transformer_flux.dispatch_attention_fn

    def spy(query, key, value, **kwargs):
        seen.append(query.shape[1])
        assert key.shape[1] >= query.shape[1]
        return original(query, key, value, **kwargs)

    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", spy)
    vramkit.optimize(pipe, strategies=[AttentionSlicing(chunk=64)])
    out = run(pipe, "flux", height=128, width=128)
    assert seen and max(seen) <= 64, f"query lengths seen: {sorted(set(seen))}"
    assert len(seen) > 2 * len([m for m in pipe.transformer.modules() if hasattr(m, "processor")])
    assert torch.equal(out, reference)
    vramkit.restore(pipe)
    seen.clear()
    run(pipe, "flux", height=128, width=128)
    assert max(seen) > 64  # unchunked again


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.integers(min_value=1, max_value=200), kind=st.sampled_from(["flux", "controlnet"]))
def test_any_chunk_gives_the_same_image(chunk, kind, reference_outputs):
    pipe = tiny_pipeline(kind)
    plan = vramkit.optimize(pipe, strategies=[AttentionSlicing(chunk=chunk)])
    out = run(pipe, kind)
    if plan.lossless:
        assert torch.equal(out, reference_outputs[kind])
    else:  # chunks that are not a multiple of 64 may change the last bits only
        assert torch.allclose(out, reference_outputs[kind], atol=1e-5, rtol=0)
    vramkit.restore(pipe)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tile=st.integers(min_value=8, max_value=128).map(lambda t: t * 8),
    overlap=st.floats(min_value=0.0, max_value=0.45),
)
def test_vae_tiling_arguments_round_trip_and_restore(tile, overlap):
    pipe = tiny_pipeline("flux")
    vae = pipe.vae
    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor)
    vramkit.optimize(pipe, strategies=[VaeTiling(tile=tile, overlap=overlap)])
    assert vae.use_tiling and vae.tile_sample_min_size == tile
    assert vae.tile_latent_min_size * 2 ** (len(vae.config.block_out_channels) - 1) == tile
    vramkit.restore(pipe)
    assert (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor) == saved


COMPONENTS = ["text_encoder", "text_encoder_2", "transformer", "vae"]


@settings(max_examples=10, deadline=None)
@given(subset=st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4, unique=True))
def test_precision_on_any_component_subset(subset):
    pipe = tiny_pipeline("flux")
    plan = vramkit.optimize(pipe, strategies=[vramkit.strategies.Precision("fp32", components=tuple(subset))])
    assert sorted(s.component for s in plan.steps) == sorted(subset)
    assert plan.lossless
    vramkit.restore(pipe)
    assert_no_hooks(pipe, type(pipe))


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_every_kind_is_a_supported_flux_pipeline(kind):
    pipe = tiny_pipeline(kind)
    from vramkit._pipeline import check_flux_pipeline

    check_flux_pipeline(pipe)
