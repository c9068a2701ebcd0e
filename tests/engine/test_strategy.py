"""The BlockStreaming strategy config and its apply function (a no-op without CUDA)."""

from __future__ import annotations

import logging

import pytest
import torch
from streaming_models import assert_no_hooks, assert_same_as, snapshot

from vramkit.errors import InvalidRequestError, StrategyConflictError
from vramkit.strategies.base import get_apply_fn, strategy_from_dict, strategy_types
from vramkit.strategies.streaming import NO_CUDA_REASON, BlockStreaming, apply_block_streaming

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")


def test_defaults_and_class_attributes() -> None:
    s = BlockStreaming()
    assert (s.resident, s.prefetch, s.storage, s.components, s.device) == (None, 1, None, None, None)
    assert BlockStreaming.name == "BlockStreaming" and BlockStreaming.order == 70
    assert BlockStreaming.conflicts_with == {"ModelOffload", "SequentialOffload", "Quantize", "StoreFP8"}
    assert BlockStreaming.reversible and BlockStreaming.default_components == ("transformer",)
    assert strategy_types()["BlockStreaming"] is BlockStreaming
    assert get_apply_fn(s) is apply_block_streaming


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resident": -1},
        {"resident": True},
        {"resident": 2.0},
        {"prefetch": 0},
        {"prefetch": True},
        {"storage": "fp4"},
        {"storage": "nf4"},
        {"components": ("vae",)},
        {"components": ()},
        {"components": ("transformer", "transformer")},
        {"device": "warp-drive"},
        {"budget": 0},
        {"pinned_limit": -5},
        {"host": "ssd"},
        {"host": None},
        {"offload_folder": "/somewhere"},
        {"host": "disk", "offload_folder": ""},
        {"host": "disk", "offload_folder": 3},
    ],
)
def test_invalid_arguments(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidRequestError):
        BlockStreaming(**kwargs)


def test_normalisation_and_round_trip() -> None:
    s = BlockStreaming(resident=3, prefetch=2, storage="FP8", components=["controlnet", "text_encoder_2"])
    assert s.storage == "fp8" and s.components == ("controlnet", "text_encoder_2")
    assert strategy_from_dict(s.to_dict()) == s
    assert BlockStreaming(components="transformer").components == ("transformer",)


def test_lossless_per_storage() -> None:
    from vramkit.testing import tiny_pipeline

    pipe = tiny_pipeline("flux")  # float32 weights
    assert BlockStreaming().step_lossless(pipe, "transformer")
    assert not BlockStreaming(storage="fp8").step_lossless(pipe, "transformer")
    assert not BlockStreaming(storage="int8").step_lossless(pipe, "transformer")
    assert not BlockStreaming(storage="bf16").step_lossless(pipe, "transformer")
    pipe.transformer.to(torch.bfloat16)
    assert BlockStreaming(storage="bf16").step_lossless(pipe, "transformer")
    assert BlockStreaming(storage="fp16").step_lossless(pipe, "transformer")
    assert BlockStreaming().step_reversible(pipe, "transformer")


@cpu_only
def test_reason_without_cuda() -> None:
    assert BlockStreaming().default_reason("transformer") == NO_CUDA_REASON
    assert NO_CUDA_REASON == "no CUDA device: BlockStreaming is a no-op here"


def test_reason_for_an_explicit_cpu_device() -> None:
    assert BlockStreaming(device="cpu").default_reason("transformer") == NO_CUDA_REASON


@cpu_only
def test_apply_without_cuda_is_a_logged_no_op(caplog: pytest.LogCaptureFixture) -> None:
    from vramkit.testing import tiny_pipeline
    from vramkit.testing.checks import run_tiny

    pipe = tiny_pipeline("flux")
    ref = run_tiny(pipe, "flux")
    snap = snapshot(pipe.transformer)
    with caplog.at_level(logging.INFO, logger="vramkit"):
        undo = apply_block_streaming(pipe, BlockStreaming(resident=1), "transformer")
    assert any(NO_CUDA_REASON in r.getMessage() for r in caplog.records)
    assert_no_hooks(pipe.transformer)
    assert torch.equal(run_tiny(pipe, "flux"), ref)
    undo()
    assert_same_as(pipe.transformer, snap)
    assert torch.equal(run_tiny(pipe, "flux"), ref)


@cpu_only
def test_through_optimize_and_restore() -> None:
    import vramkit
    from vramkit.testing import tiny_pipeline
    from vramkit.testing.checks import assert_no_hooks as assert_pipeline_clean
    from vramkit.testing.checks import run_tiny

    pipe = tiny_pipeline("controlnet")
    built = type(pipe)
    ref = run_tiny(pipe, "controlnet")
    plan = vramkit.optimize(pipe, strategies=[BlockStreaming(components=("transformer", "controlnet"))])
    assert [s.component for s in plan.steps] == ["transformer", "controlnet"]
    assert all(s.reason == NO_CUDA_REASON for s in plan.steps)
    assert plan.lossless
    assert torch.equal(run_tiny(pipe, "controlnet"), ref)
    vramkit.restore(pipe)
    assert_pipeline_clean(pipe, built)
    assert torch.equal(run_tiny(pipe, "controlnet"), ref)


def test_conflicts_with_store_fp8() -> None:
    import vramkit
    from vramkit.strategies import StoreFP8
    from vramkit.testing import tiny_pipeline

    pipe = tiny_pipeline("flux")
    with pytest.raises(StrategyConflictError):
        vramkit.api.plan_from_strategies(pipe, [BlockStreaming(), StoreFP8()])


def test_check_refuses_a_missing_component() -> None:
    from vramkit.testing import tiny_pipeline

    pipe = tiny_pipeline("flux")
    with pytest.raises(InvalidRequestError):
        BlockStreaming(components=("controlnet",)).check(pipe, "controlnet")
    BlockStreaming().check(pipe, "transformer")
    BlockStreaming(components=("text_encoder_2",)).check(pipe, "text_encoder_2")


def test_disk_host_config_round_trip_and_reason(tmp_path) -> None:
    s = BlockStreaming(resident=2, host="DISK", offload_folder=tmp_path, device="cpu")
    assert s.host == "disk" and s.offload_folder == str(tmp_path)
    assert strategy_from_dict(s.to_dict()) == s
    assert BlockStreaming().host == "ram" and BlockStreaming().offload_folder is None
    assert "memory-mapped file" in s.default_reason("transformer")
    assert s.step_lossless(None, "transformer") and s.step_reversible(None, "transformer")


def test_disk_host_through_optimize_on_cpu_is_bit_identical_and_restore_deletes_the_file(tmp_path) -> None:
    """``host="disk"`` with an explicit ``device="cpu"`` streams on a machine without a GPU too."""
    import os

    import vramkit
    from vramkit.engine import streamer_of
    from vramkit.testing import tiny_pipeline
    from vramkit.testing.checks import assert_no_hooks as assert_pipeline_clean
    from vramkit.testing.checks import run_tiny

    pipe = tiny_pipeline("flux")
    built = type(pipe)
    ref = run_tiny(pipe, "flux")
    snaps = {c: snapshot(getattr(pipe, c)) for c in ("transformer", "text_encoder_2")}
    folder = tmp_path / "off"
    plan = vramkit.optimize(
        pipe,
        strategies=[
            BlockStreaming(
                resident=1,
                host="disk",
                offload_folder=str(folder),
                device="cpu",
                components=("transformer", "text_encoder_2"),
            )
        ],
    )
    assert all("memory-mapped" in s.reason for s in plan.steps)
    assert sorted(os.listdir(folder)) and len(os.listdir(folder)) == 2
    for c in ("transformer", "text_encoder_2"):
        streamer = streamer_of(getattr(pipe, c))
        assert streamer is not None and streamer.host == "disk" and streamer.file_nbytes > 0
    assert torch.equal(run_tiny(pipe, "flux"), ref)
    vramkit.restore(pipe)
    assert_pipeline_clean(pipe, built)
    for c, snap in snaps.items():
        assert_same_as(getattr(pipe, c), snap)
    assert not folder.exists()
    assert torch.equal(run_tiny(pipe, "flux"), ref)
