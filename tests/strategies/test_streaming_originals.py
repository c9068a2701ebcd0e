"""``BlockStreaming(originals=...)``: validation, where the config says the originals of re-encoded
weights live, and the apply function handing it to the engine (on the CPU, with the CUDA check
stubbed: the engine itself runs on the CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from vramkit.errors import InvalidRequestError
from vramkit.strategies.base import strategy_from_dict
from vramkit.strategies.streaming import BlockStreaming, apply_block_streaming


def _params(module: torch.nn.Module) -> dict[str, tuple[int, torch.device, torch.Tensor]]:
    return {name: (id(p), p.device, p.detach().clone()) for name, p in module.named_parameters()}


def _assert_same(module: torch.nn.Module, before: dict[str, tuple[int, torch.device, torch.Tensor]]) -> None:
    now = {name: p for name, p in module.named_parameters()}
    assert now.keys() == before.keys()
    for name, (pid, device, value) in before.items():
        p = now[name]
        assert id(p) == pid and p.device == device and p.dtype == value.dtype, name
        assert torch.equal(p.detach(), value), name


@pytest.mark.parametrize("value", ["ssd", None, 1, ""])
def test_a_bad_originals_value_is_refused_naming_the_choices(value) -> None:
    with pytest.raises(InvalidRequestError, match=r"originals=.*'ram'.*'disk'"):
        BlockStreaming(storage="fp8", originals=value)


def test_originals_default_normalisation_and_round_trip(tmp_path) -> None:
    assert BlockStreaming().originals == "ram"
    s = BlockStreaming(storage="fp8", originals="DISK", offload_folder=tmp_path)
    assert s.originals == "disk" and s.host == "ram" and s.offload_folder == str(tmp_path)
    assert strategy_from_dict(s.to_dict()) == s
    # host="disk" writes the originals into its offload file anyway: "ram" is taken as "disk".
    d = BlockStreaming(storage="fp8", host="disk")
    assert d.originals == "disk" and d == BlockStreaming(storage="fp8", host="disk", originals="disk")


def test_offload_folder_needs_something_written_there(tmp_path) -> None:
    with pytest.raises(InvalidRequestError, match="host='disk' or originals='disk'"):
        BlockStreaming(storage="fp8", offload_folder=tmp_path)
    BlockStreaming(storage="fp8", originals="disk", offload_folder=tmp_path)
    BlockStreaming(host="disk", offload_folder=tmp_path)


def test_describe_shows_originals_only_where_they_are_not_implied() -> None:
    assert "originals" not in BlockStreaming(storage="fp8").describe()
    assert "originals" not in BlockStreaming(storage="fp8", host="disk").describe()
    assert "originals='disk'" in BlockStreaming(storage="fp8", originals="disk").describe()


def test_reason_says_where_the_originals_live(monkeypatch) -> None:
    monkeypatch.setattr(BlockStreaming, "_effective", lambda self: True)
    on_disk = BlockStreaming(storage="fp8", originals="disk").default_reason("transformer")
    assert "kept in a file in the offload folder" in on_disk and "not in host RAM" in on_disk
    in_ram = BlockStreaming(storage="int8").default_reason("transformer")
    assert "stay in host RAM" in in_ram
    from_disk = BlockStreaming(storage="fp8", host="disk").default_reason("transformer")
    assert "kept in a file in the offload folder" in from_disk
    # Nothing is re-encoded without a storage: nothing to say.
    assert "original" not in BlockStreaming().default_reason("transformer")


@pytest.mark.parametrize("storage", ["fp8", "int8"])
def test_apply_hands_originals_to_the_engine_and_undo_is_exact(tmp_path, monkeypatch, storage) -> None:
    from vramkit.engine import streamer_of
    from vramkit.testing import tiny_pipeline
    from vramkit.testing.checks import run_tiny

    monkeypatch.setattr(BlockStreaming, "_effective", lambda self: True)
    pipe = tiny_pipeline("flux")
    ref = run_tiny(pipe, "flux")
    before = _params(pipe.transformer)
    folder = tmp_path / "off"
    config = BlockStreaming(resident=1, storage=storage, device="cpu", originals="disk", offload_folder=str(folder))
    undo = apply_block_streaming(pipe, config, "transformer")
    try:
        streamer = streamer_of(pipe.transformer)
        assert streamer is not None and streamer.host == "ram" and streamer.originals == "disk"
        assert streamer._retained == {} and streamer.originals_nbytes == streamer.layout.retained_nbytes > 0
        assert len(os.listdir(folder)) == 1
        out = run_tiny(pipe, "flux")
        assert out.shape == ref.shape and torch.isfinite(out).all()
    finally:
        undo()
    _assert_same(pipe.transformer, before)
    assert not folder.exists()
    assert torch.equal(run_tiny(pipe, "flux"), ref)
