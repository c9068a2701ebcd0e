"""What ``vramkit.lora`` does beyond the strategy matrix: why each helper exists (offload hooks,
fp8 storage, quantized layers, cached prompts), its error paths, and ``lora_weight_bytes``."""

from __future__ import annotations

import pytest
import torch
from tiny_loras import TRANSFORMER_TARGETS, make_lora

import vramkit
from vramkit import lora
from vramkit._pipeline import foreign_hooks
from vramkit.errors import StrategyConflictError, VramkitError
from vramkit.strategies import (
    AttentionSlicing,
    BlockStreaming,
    ModelOffload,
    PromptCache,
    Quantize,
    SequentialOffload,
    StoreFP8,
    VaeSlicing,
)
from vramkit.strategies.quantize import backend_available
from vramkit.testing import tiny_pipeline
from vramkit.testing.checks import assert_no_hooks, run_tiny


def run(pipe) -> torch.Tensor:
    return run_tiny(pipe, "flux")


def _q_proj(pipe) -> torch.nn.Module:
    return pipe.transformer.transformer_blocks[0].attn.to_q


# --- plain diffusers methods where nothing needs fixing ------------------------------------------


def test_plain_diffusers_lora_methods_work_with_pipeline_level_strategies(lora_ref):
    """AttentionSlicing, VaeSlicing and PromptCache (transformer-only LoRA) leave weights alone:
    diffusers' own methods work on such a plan, bit for bit."""
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[AttentionSlicing(chunk=64), VaeSlicing(), PromptCache(release="cpu")])
    pipe.load_lora_weights(lora_ref.state_dict, adapter_name="a")
    assert torch.equal(run(pipe), lora_ref.lora)
    pipe.set_adapters(["a"], adapter_weights=[0.5])
    assert torch.equal(run(pipe), lora_ref.half)
    pipe.set_adapters(["a"], adapter_weights=[1.0])
    pipe.fuse_lora()
    assert torch.equal(run(pipe), lora_ref.fused)
    pipe.unfuse_lora()
    assert torch.equal(run(pipe), lora_ref.unfused)
    vramkit.restore(pipe)
    assert_no_hooks(pipe, type(pipe))


def test_helpers_on_a_pipeline_vramkit_never_touched_just_call_diffusers(lora_ref):
    pipe = tiny_pipeline("flux")
    lora.load_lora_weights(pipe, lora_ref.state_dict, adapter_name="a")
    assert torch.equal(run(pipe), lora_ref.lora)
    lora.set_adapters(pipe, "a", adapter_weights=0.5)
    assert torch.equal(run(pipe), lora_ref.half)


# --- offloading ------------------------------------------------------------------------------------


def test_offload_plan_stays_vramkits_after_loading(lora_ref):
    """diffusers alone would strip the hooks and call enable_model_cpu_offload (no accelerator here:
    an error; with one: diffusers' hooks in place of vramkit's). The helper keeps vramkit's."""
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[ModelOffload(device="cpu")])
    lora.load_lora_weights(pipe, lora_ref.state_dict, adapter_name="a")
    assert getattr(pipe.transformer._hf_hook, "_vramkit", False)
    assert not getattr(pipe, "_all_hooks", None)
    assert foreign_hooks(pipe) == []
    assert torch.equal(run(pipe), lora_ref.lora)


def test_fuse_under_sequential_offload_merges_the_real_weights(lora_ref):
    """Under SequentialOffload the weights are meta placeholders: diffusers' fuse_lora would merge
    into nothing and drop the LoRA. The helper merges into the real weights."""
    pipe = tiny_pipeline("flux")
    pipe.load_lora_weights(lora_ref.state_dict, adapter_name="a")
    vramkit.optimize(pipe, strategies=[SequentialOffload(device="cpu")])
    assert _q_proj(pipe).base_layer.weight.device.type == "meta"
    lora.fuse_lora(pipe)
    assert _q_proj(pipe).base_layer.weight.device.type == "meta"  # offloaded again
    assert torch.equal(run(pipe), lora_ref.fused)
    vramkit.restore(pipe)
    assert torch.equal(run(pipe), lora_ref.fused)


def test_two_adapters_delete_and_unload_under_sequential_offload(lora_ref):
    other = make_lora(tiny_pipeline("flux").transformer, "transformer", TRANSFORMER_TARGETS, seed=3)
    reference = tiny_pipeline("flux")
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[SequentialOffload(device="cpu")])
    reference.load_lora_weights(lora_ref.state_dict, adapter_name="a")
    reference.load_lora_weights(other, adapter_name="b")
    lora.load_lora_weights(pipe, lora_ref.state_dict, adapter_name="a")
    lora.load_lora_weights(pipe, other, adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
    lora.set_adapters(pipe, ["a", "b"], adapter_weights=[0.7, 0.3])
    mixed = run(pipe)
    assert torch.equal(mixed, run(reference))
    assert not torch.equal(mixed, lora_ref.lora)

    reference.delete_adapters("b")
    lora.delete_adapters(pipe, "b")
    assert torch.equal(run(pipe), run(reference))
    lora.unload_lora_weights(pipe)
    assert not lora.has_lora(pipe)
    assert torch.equal(run(pipe), lora_ref.none)
    vramkit.restore(pipe)
    assert_no_hooks(pipe, type(pipe))


@pytest.mark.skipif(BlockStreaming is None, reason="vramkit.strategies.streaming is not importable")
def test_block_streaming_engine_with_lora(monkeypatch, lora_ref):
    """The BlockStreaming strategy is a no-op without CUDA; make it run the engine on the CPU (its
    synchronous copier) to check that a LoRA loaded and fused while blocks are streamed is right."""
    from vramkit.strategies import streaming

    monkeypatch.setattr(BlockStreaming, "_effective", lambda self: True)
    monkeypatch.setattr(streaming, "_device", lambda config: torch.device("cpu"))
    pipe = tiny_pipeline("flux")
    plan = vramkit.optimize(pipe, strategies=[BlockStreaming(resident=0, device="cpu")])
    assert plan.lossless
    assert torch.equal(run(pipe), lora_ref.none)
    lora.load_lora_weights(pipe, lora_ref.state_dict, adapter_name="a")
    assert torch.equal(run(pipe), lora_ref.lora)
    lora.fuse_lora(pipe)
    assert torch.equal(run(pipe), lora_ref.fused)
    lora.unfuse_lora(pipe)
    assert torch.equal(run(pipe), lora_ref.unfused)
    vramkit.restore(pipe)
    assert_no_hooks(pipe, type(pipe))
    assert torch.equal(run(pipe), lora_ref.unfused)


def test_reapply_failure_is_reported_and_plan_says_what_is_applied(monkeypatch, lora_ref):
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[AttentionSlicing(chunk=64), ModelOffload(device="cpu")])

    def broken(config):
        def apply(*args):
            raise RuntimeError("no device")

        return apply

    monkeypatch.setattr(lora, "get_apply_fn", broken)
    with pytest.raises(VramkitError, match=r"re-applying ModelOffload.*no device"):
        lora.load_lora_weights(pipe, lora_ref.state_dict, adapter_name="a")
    assert [s.name for s in vramkit.applied_plan(pipe).steps] == ["AttentionSlicing"]
    assert [s.name for s in pipe.vramkit_plan.steps] == ["AttentionSlicing"]
    assert torch.equal(run(pipe), lora_ref.lora)  # the LoRA is in, the pipeline works
    vramkit.restore(pipe)
    assert_no_hooks(pipe, type(pipe))


def test_method_overrides_make_plain_calls_work(lora_ref):
    """What the proposed patch to vramkit._state does: the optimized pipeline's class routes the
    LoRA methods through vramkit.lora, so plain pipe.load_lora_weights works under any plan."""
    pipe = tiny_pipeline("flux")
    built_class = type(pipe)
    vramkit.optimize(pipe, strategies=[SequentialOffload(device="cpu")])
    wrapped = type(pipe)
    overrides = lora.pipeline_method_overrides(wrapped)
    assert {"load_lora_weights", "fuse_lora", "unfuse_lora", "set_adapters"} <= set(overrides)
    assert overrides["load_lora_weights"].__doc__ == built_class.load_lora_weights.__doc__
    pipe.__class__ = type(wrapped.__name__, (wrapped,), {**overrides, "_vramkit_wrapped": True})
    pipe.load_lora_weights(lora_ref.state_dict, adapter_name="a")
    assert torch.equal(run(pipe), lora_ref.lora)
    pipe.fuse_lora()
    assert torch.equal(run(pipe), lora_ref.fused)
    vramkit.restore(pipe)
    assert_no_hooks(pipe, built_class)


# --- cached prompts --------------------------------------------------------------------------------


def test_text_encoder_lora_drops_stale_cached_prompts(full_lora_ref):
    """A LoRA on the text encoder changes the prompt embeddings PromptCache keeps; the helpers drop
    them (diffusers' methods alone would keep serving the embeddings from before the LoRA)."""
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[PromptCache(release="cpu")])
    assert torch.equal(run(pipe), full_lora_ref.none)  # the prompt is now cached
    lora.load_lora_weights(pipe, full_lora_ref.state_dict, adapter_name="a")
    assert torch.equal(run(pipe), full_lora_ref.lora)
    lora.set_adapters(pipe, ["a"], adapter_weights=[0.5])
    assert torch.equal(run(pipe), full_lora_ref.half)
    cached = len(pipe.encode_prompt.entries)
    lora.set_adapters(pipe, ["a"], adapter_weights=[0.5])  # no change: the cache stays
    assert len(pipe.encode_prompt.entries) == cached == 1
    lora.disable_lora(pipe)
    assert torch.equal(run(pipe), full_lora_ref.none)
    lora.enable_lora(pipe)
    lora.set_adapters(pipe, ["a"], adapter_weights=[1.0])
    lora.fuse_lora(pipe, components=["transformer", "text_encoder"])
    assert (run(pipe) - full_lora_ref.lora).abs().max().item() < 1e-5


# --- fp8 storage -----------------------------------------------------------------------------------


def test_lora_after_store_fp8_keeps_adapters_in_the_compute_dtype(lora_ref):
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[StoreFP8()])
    lora.load_lora_weights(pipe, lora_ref.state_dict, adapter_name="a")
    layer = _q_proj(pipe)
    assert layer.base_layer.weight.dtype == torch.float8_e4m3fn
    assert layer.lora_A["a"].weight.dtype == torch.float32  # the compute dtype, not float8
    assert torch.equal(
        layer.lora_B["a"].weight, lora_ref.state_dict["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    )
    assert not any("compute_dtype" in m.__dict__ for m in pipe.transformer.modules())
    lora.fuse_lora(pipe)
    assert layer.base_layer.weight.dtype == torch.float8_e4m3fn  # fused, stored in fp8 again
    assert not any("merge" in m.__dict__ for m in pipe.transformer.modules())
    assert foreign_hooks(pipe) == []


# --- quantized layers ------------------------------------------------------------------------------


@pytest.mark.skipif(not backend_available("torchao"), reason="torchao not installed")
def test_torchao_layers_fuse_and_stay_quantized(lora_ref):
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[Quantize("int8", "torchao")])
    lora.load_lora_weights(pipe, lora_ref.state_dict, adapter_name="a")
    layer = _q_proj(pipe)
    assert type(layer).__name__ == "TorchaoLoraLinear"
    assert layer.get_apply_tensor_subclass is not None
    lora.fuse_lora(pipe)
    assert type(layer.base_layer.weight).__module__.startswith("torchao")
    assert layer.merged


@pytest.mark.skipif(not backend_available("quanto"), reason="optimum-quanto not installed")
def test_quanto_loads_unfused_and_refuses_to_fuse_with_advice(lora_ref):
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[Quantize("int8", "quanto")])
    lora.load_lora_weights(pipe, lora_ref.state_dict, adapter_name="a")
    assert "_maybe_expand_lora_state_dict" not in pipe.__dict__
    out = run(pipe)
    with pytest.raises(StrategyConflictError) as info:
        lora.fuse_lora(pipe)
    message = str(info.value)
    assert "Quantize(weights='int8', backend='quanto')" in message
    assert "pipe.fuse_lora(), pipe.unload_lora_weights(), then vramkit.optimize" in message
    assert "StoreFP8" in message and "BlockStreaming" in message
    assert torch.equal(run(pipe), out)


@pytest.mark.parametrize("backend", ["quanto", "torchao"])
def test_a_lora_that_widens_quantized_layers_is_refused_before_anything_changes(backend, lora_ref):
    """Flux Control LoRAs widen input layers; diffusers rebuilds such a layer as a float Linear,
    which breaks a quantized one. The helper refuses first."""
    if not backend_available(backend):
        pytest.skip(f"{backend} not installed")
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[Quantize("int8", backend)])
    out = run(pipe)
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    widened = dict(lora_ref.state_dict)
    widened[key] = torch.zeros(widened[key].shape[0], widened[key].shape[1] * 2)
    with pytest.raises(StrategyConflictError, match="a quantized layer cannot be widened"):
        lora.load_lora_weights(pipe, widened, adapter_name="a")
    assert not lora.has_lora(pipe)
    assert not any(k.startswith("_maybe_expand") for k in pipe.__dict__)
    assert torch.equal(run(pipe), out)


def test_narrow_loras_are_zero_padded_like_diffusers_does():
    """The stand-in for diffusers' padding step on quanto transformers (a LoRA trained before a
    Control LoRA widened x_embedder gets zero columns for the new inputs)."""
    transformer = tiny_pipeline("flux").transformer
    narrow = torch.randn(4, 32)
    state = {"transformer.x_embedder.lora_A.weight": narrow, "transformer.x_embedder.lora_B.weight": torch.randn(32, 4)}
    out = lora._pad_narrow_loras(transformer=transformer, lora_state_dict=dict(state))
    padded = out["transformer.x_embedder.lora_A.weight"]
    assert padded.shape == (4, transformer.x_embedder.in_features)
    assert torch.equal(padded[:, :32], narrow) and not padded[:, 32:].any()
    assert out["transformer.x_embedder.lora_B.weight"] is state["transformer.x_embedder.lora_B.weight"]


@pytest.mark.skipif(not backend_available("quanto"), reason="optimum-quanto not installed")
def test_fuse_unload_then_quantize_is_the_recommended_order(lora_ref):
    pipe = tiny_pipeline("flux")
    pipe.load_lora_weights(lora_ref.state_dict, adapter_name="a")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert lora.lora_weight_bytes(pipe.transformer) == 0
    vramkit.optimize(pipe, strategies=[Quantize("int8", "quanto")])
    diff = (run(pipe) - lora_ref.fused).abs()
    assert diff.max().item() <= 0.025 and diff.mean().item() <= 0.0025


# --- lora_weight_bytes -----------------------------------------------------------------------------


def _lora_param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if ".lora_" in n)


def test_lora_weight_bytes_counts_every_adapter(lora_ref):
    pipe = tiny_pipeline("flux")
    assert lora.lora_weight_bytes(pipe.transformer) == 0
    assert not lora.has_lora(pipe)
    pipe.load_lora_weights(lora_ref.state_dict, adapter_name="a")
    one = lora.lora_weight_bytes(pipe.transformer)
    expected = sum(t.numel() * 4 for t in lora_ref.state_dict.values())
    assert one == expected == _lora_param_bytes(pipe.transformer)
    assert lora.has_lora(pipe) and lora.has_lora(pipe.transformer)
    assert not lora.has_lora(pipe.text_encoder)
    pipe.load_lora_weights(lora_ref.state_dict, adapter_name="b")
    assert lora.lora_weight_bytes(pipe.transformer) == 2 * one
    pipe.fuse_lora(adapter_names=["a"])
    assert lora.lora_weight_bytes(pipe.transformer) == 2 * one  # fused adapters stay in memory
    pipe.transformer.to(torch.bfloat16)
    assert lora.lora_weight_bytes(pipe.transformer) == one
    pipe.transformer.to("meta")
    assert lora.lora_weight_bytes(pipe.transformer) == one


def test_lora_weight_bytes_under_sequential_offload(lora_ref):
    pipe = tiny_pipeline("flux")
    pipe.load_lora_weights(lora_ref.state_dict, adapter_name="a")
    expected = lora.lora_weight_bytes(pipe.transformer)
    vramkit.optimize(pipe, strategies=[SequentialOffload(device="cpu")])
    assert lora.lora_weight_bytes(pipe.transformer) == expected
