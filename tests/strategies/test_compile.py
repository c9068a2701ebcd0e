"""Compile: regional compilation of the repeated blocks, same output with a lossless backend, no
recompilation after warm-up, refused with CUDA graphs where weights move, undone by restore."""

from __future__ import annotations

import pytest
import torch

import vramkit
from vramkit.errors import InvalidRequestError, StrategyConflictError, VramkitError
from vramkit.strategies import Compile, ModelOffload
from vramkit.strategies.compile import repeated_blocks
from vramkit.testing import tiny_pipeline
from vramkit.testing.checks import assert_no_hooks
from vramkit.testing.checks import run_tiny as run


def test_compiled_blocks_same_output_and_no_recompilation(reference_outputs):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    pipe = tiny_pipeline("flux")
    plan = vramkit.optimize(pipe, strategies=[Compile(backend="aot_eager")])
    assert plan.lossless
    blocks = repeated_blocks(pipe.transformer)
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert torch.equal(run(pipe, "flux"), reference_outputs["flux"])
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(2):
        assert torch.equal(run(pipe, "flux"), reference_outputs["flux"])
    assert counters["stats"]["unique_graphs"] == graphs, "a later call recompiled"
    vramkit.restore(pipe)
    assert all(b._compiled_call_impl is None for b in blocks)
    assert_no_hooks(pipe, type(pipe))


def test_cuda_graph_modes_are_refused_where_weights_move():
    pipe = tiny_pipeline("flux")
    with pytest.raises(VramkitError, match="CUDA graphs"):
        vramkit.optimize(pipe, strategies=[ModelOffload(device="cpu"), Compile(mode="reduce-overhead")])
    assert "_vramkit_state" not in pipe.__dict__


def test_compile_is_marked_lossy_with_inductor_and_validates_arguments():
    pipe = tiny_pipeline("flux")
    assert not Compile().step_lossless(pipe, "transformer")
    with pytest.raises(InvalidRequestError):
        Compile(mode="fastest")
    assert issubclass(StrategyConflictError, VramkitError)


def test_streamed_blocks_compile_beneath_the_hooks_without_recompiling(reference_outputs):
    """Compiled over the streaming hooks, dynamo would trace the slot bookkeeping and recompile per
    block (found with benchmarks/bench_compile.py --tiny); beneath them, one graph per block class."""
    from torch._dynamo.utils import counters

    from vramkit.engine import enable_block_streaming
    from vramkit.strategies.compile import apply_compile

    torch._dynamo.reset()
    counters.clear()
    pipe = tiny_pipeline("flux")
    streamer = enable_block_streaming(pipe.transformer, resident=1, device="cpu")
    undo = apply_compile(pipe, Compile(backend="aot_eager"), "transformer")
    assert torch.equal(run(pipe, "flux"), reference_outputs["flux"])
    graphs = counters["stats"]["unique_graphs"]
    # Double block, single block, and the resident block compiled as a whole: no graph per block.
    assert graphs <= 4
    for _ in range(2):
        assert torch.equal(run(pipe, "flux"), reference_outputs["flux"])
    assert counters["stats"]["unique_graphs"] == graphs, "a later call recompiled"
    assert not counters["recompiles"], dict(counters["recompiles"])
    undo()
    streamer.restore()
    assert torch.equal(run(pipe, "flux"), reference_outputs["flux"])
    assert all(b._compiled_call_impl is None for b in repeated_blocks(pipe.transformer))
