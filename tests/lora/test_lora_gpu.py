"""LoRA with the strategies that place weights on a CUDA device (skipped without one): offloading and
block streaming move LoRA layers with their base layers, bit-identical to the pipeline on the GPU."""

from __future__ import annotations

import pytest
import torch

import vramkit
from vramkit import lora
from vramkit._pipeline import foreign_hooks
from vramkit.strategies import BlockStreaming, ModelOffload, SequentialOffload, StoreFP8
from vramkit.testing import tiny_pipeline
from vramkit.testing.checks import assert_no_hooks, run_tiny

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def run(pipe) -> torch.Tensor:
    return run_tiny(pipe, "flux").cpu()


@pytest.fixture(scope="module")
def gpu_ref(transformer_lora):
    """The tiny pipeline entirely on the GPU with the LoRA: loaded, weight 0.5, fused, unfused."""
    pipe = tiny_pipeline("flux").to("cuda")
    run(pipe)
    out = {"none": run(pipe)}
    pipe.load_lora_weights(transformer_lora, adapter_name="a")
    out["lora"] = run(pipe)
    pipe.set_adapters(["a"], adapter_weights=[0.5])
    out["half"] = run(pipe)
    pipe.set_adapters(["a"], adapter_weights=[1.0])
    pipe.fuse_lora()
    out["fused"] = run(pipe)
    pipe.unfuse_lora()
    out["unfused"] = run(pipe)
    return out


PLANS = [
    pytest.param([ModelOffload()], id="model-offload"),
    pytest.param([SequentialOffload()], id="sequential-offload"),
]
if BlockStreaming is not None:
    PLANS += [
        pytest.param([BlockStreaming(resident=0), ModelOffload()], id="block-streaming-0-resident"),
        pytest.param([BlockStreaming(resident=2, prefetch=1), ModelOffload()], id="block-streaming-2-resident"),
    ]


@pytest.mark.parametrize("when", ["after", "before"])
@pytest.mark.parametrize("strategies", PLANS)
def test_gpu_placement_with_lora_is_bit_identical(strategies, when, transformer_lora, gpu_ref):
    pipe = tiny_pipeline("flux")
    built_class = type(pipe)
    if when == "before":
        pipe.load_lora_weights(transformer_lora, adapter_name="a")
    plan = vramkit.optimize(pipe, strategies=strategies)
    assert plan.lossless
    if when == "after":
        assert torch.equal(run(pipe), gpu_ref["none"])
        lora.load_lora_weights(pipe, transformer_lora, adapter_name="a")
    assert foreign_hooks(pipe) == []
    assert torch.equal(run(pipe), gpu_ref["lora"])
    lora.set_adapters(pipe, ["a"], adapter_weights=[0.5])
    assert torch.equal(run(pipe), gpu_ref["half"])
    lora.set_adapters(pipe, ["a"], adapter_weights=[1.0])
    lora.fuse_lora(pipe)
    assert torch.equal(run(pipe), gpu_ref["fused"])
    lora.unfuse_lora(pipe)
    assert torch.equal(run(pipe), gpu_ref["unfused"])
    vramkit.restore(pipe)
    assert_no_hooks(pipe, built_class)


def test_store_fp8_on_gpu_with_lora(transformer_lora, gpu_ref):
    pipe = tiny_pipeline("flux").to("cuda")
    vramkit.optimize(pipe, strategies=[StoreFP8()])
    lora.load_lora_weights(pipe, transformer_lora, adapter_name="a")
    diff = (run(pipe) - gpu_ref["lora"]).abs()
    assert diff.max().item() <= 0.14 and diff.mean().item() <= 0.014
    lora.fuse_lora(pipe)
    diff = (run(pipe) - gpu_ref["fused"]).abs()
    assert diff.max().item() <= 0.14 and diff.mean().item() <= 0.014
