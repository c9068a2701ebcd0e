"""Components on two real GPUs (skipped unless two CUDA devices are visible): the tiny pipeline split
across cuda:0 and cuda:1 gives the same image as the unoptimized pipeline on cuda:0, and restore
puts every component back and removes every hook. Run on the GPU machine:
`python -m pytest tests/gpu/test_multi_gpu.py -q`."""

from __future__ import annotations

import pytest
import torch

import vramkit
from vramkit._pipeline import snapshot
from vramkit.strategies import BlockStreaming, Resident
from vramkit.testing import tiny_call_kwargs, tiny_pipeline
from vramkit.testing.checks import assert_no_hooks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


def _run(pipe, kind):
    return pipe(**tiny_call_kwargs(kind)).images.float().cpu()


def _devices(pipe):
    return {n: {p.device for p in m.parameters()} for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


@pytest.mark.parametrize("kind", ["flux", "fill", "controlnet", "kontext"])
@pytest.mark.parametrize("stream_t5", [False, True])
def test_split_across_two_gpus_is_bit_identical(kind, stream_t5):
    pipe = tiny_pipeline(kind).to("cuda:0")
    ref = _run(pipe, kind)
    before, cls = snapshot(pipe), type(pipe)
    main = ("transformer",) + (("controlnet",) if kind == "controlnet" else ())
    aux = ("text_encoder", "vae") if stream_t5 else ("text_encoder", "text_encoder_2", "vae")
    strategies = [Resident(components=main, device="cuda:0"), Resident(components=aux, device="cuda:1")]
    if stream_t5:
        strategies.append(BlockStreaming(resident=0, components=("text_encoder_2",), device="cuda:1"))
    vramkit.optimize(pipe, strategies=strategies)
    assert pipe._execution_device == torch.device("cuda", 0)
    assert pipe.vae.device == torch.device("cuda", 1)
    out = _run(pipe, kind)
    assert torch.equal(out, ref)
    vramkit.restore(pipe)
    assert_no_hooks(pipe, cls)
    assert snapshot(pipe) == before
    assert all(devs == {torch.device("cuda", 0)} for devs in _devices(pipe).values())


def test_planned_two_gpu_plan_runs_and_restores():
    pipe = tiny_pipeline("flux").to("cpu")
    ref = _run(tiny_pipeline("flux").to("cuda:0"), "flux")
    before, cls = snapshot(pipe), type(pipe)
    plan = vramkit.optimize(pipe, vram={"cuda:0": "2GiB", "cuda:1": "2GiB"}, quality="lossless")
    assert plan.predicted is not None
    out = _run(pipe, "flux")
    assert torch.allclose(out, ref, atol=1e-5)  # planned on cuda, reference on cuda:0: same kernels
    vramkit.restore(pipe)
    assert_no_hooks(pipe, cls)
    assert snapshot(pipe) == before
