"""``originals="disk"`` with blocks streamed from RAM: the original values of fp8/int8/cast entries
(kept for an exact restore) go to an offload file block by block instead of host RAM; the restore is
still bit-exact and the file is gone afterwards, also when the start fails midway."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import pytest
import torch
from streaming_models import assert_no_hooks, assert_same_as, build_flux, flux_inputs, snapshot

from vramkit.engine import BlockStreamer, CheckingCopier, SyncCopier, compute_layout, enable_block_streaming
from vramkit.engine.host import OFFLOAD_SUFFIX, OffloadFile
from vramkit.errors import InvalidRequestError


def _run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:  # type: ignore[type-arg]
    with torch.inference_mode():
        return model(**inputs)[0].clone()


def _file_value(path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor read from the file with plain file I/O (not through the streamer's mapping)."""
    nbytes = dtype.itemsize * (int(torch.Size(shape).numel()))
    with open(path, "rb") as fh:
        fh.seek(offset)
        raw = bytearray(fh.read(nbytes))
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(shape).clone()


def _full_name(s: BlockStreamer, pos: int, name: str) -> str:
    return f"{s._names[id(s._blocks[pos])]}.{name}"


@pytest.mark.parametrize("storage", ["fp8", "int8"])
@pytest.mark.parametrize("resident", [0, 2])
def test_originals_go_to_a_file_and_restore_exactly(tmp_path, storage, resident) -> None:
    model = build_flux(dtype=torch.bfloat16, num_layers=3, num_single_layers=4)
    inputs = flux_inputs(torch.bfloat16)
    snap = snapshot(model)
    # The same streaming with the originals in RAM: the output must not depend on where they are.
    s_ram = enable_block_streaming(model, resident=resident, storage=storage, device="cpu", copier=SyncCopier())
    assert s_ram.originals == "ram" and s_ram._retained and s_ram.summary()["offload_file"] is None
    expected = _run(model, inputs)
    s_ram.restore()
    assert_same_as(model, snap)

    folder = tmp_path / "offload"
    s = enable_block_streaming(
        model,
        resident=resident,
        storage=storage,
        device="cpu",
        copier=CheckingCopier("lazy"),
        originals="disk",
        offload_folder=folder,
    )
    path = Path(s.summary()["offload_file"])
    assert path.parent == folder and path.name.endswith(OFFLOAD_SUFFIX) and path.is_file()
    # Nothing kept in host RAM for the restore; every encoded entry of every block is in the file.
    assert s._retained == {}
    assert sorted(s._retained_at) == list(range(len(s.layout.blocks)))
    encoded = {(b.position, e.name) for b in s.layout.blocks for e in b.entries if e.codec != "raw"}
    assert {(pos, name) for pos, kept in s._retained_at.items() for name in kept} == encoded
    for pos, kept in s._retained_at.items():
        for name, (offset, dtype, shape) in kept.items():
            _, _, original = snap[_full_name(s, pos, name)]
            value = _file_value(path, offset, dtype, shape)
            assert value.dtype == original.dtype == torch.bfloat16
            assert torch.equal(value, original), name
    # The streamed blocks stay in host RAM (pageable on CPU); the file holds the originals only.
    assert s.pageable_nbytes == s.layout.streamed_nbytes and s.file_nbytes == 0
    summary = s.summary()
    assert summary["originals"] == "disk"
    assert summary["originals_nbytes_actual"] == s.layout.retained_nbytes > 0
    assert path.stat().st_size >= s.layout.retained_nbytes

    for _ in range(2):
        assert torch.equal(_run(model, inputs), expected)
    s.restore()
    assert_same_as(model, snap)  # values, dtypes, devices and parameter objects
    assert_no_hooks(model)
    assert not path.exists() and not folder.exists()
    assert s.originals_nbytes == 0


def test_each_blocks_originals_are_freed_once_written(tmp_path) -> None:
    """RAM never holds more than the block being written: when a block's originals are written,
    the storages of every earlier block's originals are gone (with originals in RAM they all stay)."""
    model = build_flux(dtype=torch.bfloat16, num_layers=3, num_single_layers=4)
    layout = compute_layout(model, resident=0, storage="fp8")
    refs: dict[int, list[weakref.ref]] = {}  # type: ignore[type-arg]
    for b in layout.blocks:
        block = getattr(model, b.stack)[b.index]
        refs[b.position] = [
            weakref.ref(dict(block.named_parameters())[e.name].untyped_storage()) for e in b.entries if e.codec != "raw"
        ]
    alive_at_write: list[int] = []

    for originals, expect_freed in (("ram", False), ("disk", True)):
        streamer = BlockStreamer(
            model, layout, device="cpu", copier=SyncCopier(), originals=originals, offload_folder=tmp_path
        )
        retain = streamer._retain
        alive_at_write.clear()

        def counting_retain(b, data, _retain=retain):  # type: ignore[no-untyped-def]
            gc.collect()
            alive_at_write.append(sum(r() is not None for p in range(b.position) for r in refs[p]))
            _retain(b, data)

        streamer._retain = counting_retain  # type: ignore[method-assign]
        streamer.start()
        gc.collect()
        alive_after = sum(r() is not None for rs in refs.values() for r in rs)
        if expect_freed:
            assert alive_at_write == [0] * len(layout.blocks)
            assert alive_after == 0
        else:
            assert alive_at_write[-1] > 0 and alive_after == sum(len(rs) for rs in refs.values())
        streamer.restore()
        # The restored parameters have new storages: watch those for the next round.
        for b in layout.blocks:
            block = getattr(model, b.stack)[b.index]
            refs[b.position] = [
                weakref.ref(dict(block.named_parameters())[e.name].untyped_storage())
                for e in b.entries
                if e.codec != "raw"
            ]
    assert not os.listdir(tmp_path)


def test_cast_storage_keeps_fp32_originals_on_disk(tmp_path) -> None:
    model = build_flux(dtype=torch.float32)
    inputs = flux_inputs(torch.float32)
    snap = snapshot(model)
    s = enable_block_streaming(
        model, resident=1, storage="bf16", device="cpu", copier=SyncCopier(), originals="disk", offload_folder=tmp_path
    )
    assert s._retained == {} and s.originals_nbytes == s.layout.retained_nbytes > 0
    assert len(os.listdir(tmp_path)) == 1
    _run(model, inputs)
    s.restore()
    assert_same_as(model, snap)
    assert not os.listdir(tmp_path)


def test_nothing_reencoded_writes_no_file(tmp_path) -> None:
    model = build_flux(dtype=torch.bfloat16)
    snap = snapshot(model)
    folder = tmp_path / "never"
    s = enable_block_streaming(
        model, resident=1, device="cpu", copier=SyncCopier(), originals="disk", offload_folder=folder
    )
    assert s.summary()["offload_file"] is None and not folder.exists()
    assert s.originals_nbytes == 0
    s.restore()
    assert_same_as(model, snap)


@pytest.mark.parametrize("fail_at", [1, 3, 20])
def test_a_failed_write_midway_rolls_back_and_deletes_the_file(tmp_path, monkeypatch, fail_at) -> None:
    """The disk fills up while the originals are written (in the first block, or a later one)."""
    model = build_flux(dtype=torch.bfloat16, num_layers=3, num_single_layers=4)
    snap = snapshot(model)
    layout = compute_layout(model, resident=2, storage="fp8")
    writes = [0]
    real_append = OffloadFile.append

    def append(self, data):  # type: ignore[no-untyped-def]
        writes[0] += 1
        if writes[0] == fail_at:
            raise OSError(28, "No space left on device")
        return real_append(self, data)

    monkeypatch.setattr(OffloadFile, "append", append)
    streamer = BlockStreamer(
        model, layout, device="cpu", copier=SyncCopier(), originals="disk", offload_folder=tmp_path
    )
    with pytest.raises(OSError, match="No space"):
        streamer.start()
    assert writes[0] == fail_at
    assert_same_as(model, snap)
    assert_no_hooks(model)
    assert not os.listdir(tmp_path)
    assert streamer._retained == {} and streamer._retained_at == {} and streamer._file is None


def test_a_failure_after_packing_restores_from_the_file_and_deletes_it(tmp_path) -> None:
    model = build_flux(dtype=torch.bfloat16)
    snap = snapshot(model)
    layout = compute_layout(model, resident=1, storage="int8")
    streamer = BlockStreamer(
        model, layout, device="cpu", copier=SyncCopier(), originals="disk", offload_folder=tmp_path
    )
    seen: list[int] = []

    def explode() -> None:
        seen.append(len(os.listdir(tmp_path)))
        raise RuntimeError("simulated failure while hooking")

    streamer._install_hooks = explode  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="simulated"):
        streamer.start()
    assert seen == [1]  # the originals were in the file when it failed
    assert_same_as(model, snap)
    assert_no_hooks(model)
    assert not os.listdir(tmp_path)


def test_bad_originals_value_is_refused() -> None:
    model = build_flux()
    with pytest.raises(InvalidRequestError, match="originals='ssd'.*'ram'.*'disk'"):
        BlockStreamer(model, compute_layout(model, resident=1), device="cpu", originals="ssd")


def test_host_disk_implies_originals_on_disk(tmp_path) -> None:
    model = build_flux(dtype=torch.bfloat16)
    s = BlockStreamer(
        model, compute_layout(model, resident=1, storage="fp8"), device="cpu", host="disk", offload_folder=tmp_path
    )
    assert s.originals == "disk"


@pytest.mark.parametrize("storage", ["fp8", "int8"])
def test_restore_hands_back_the_original_storage_kept_in_ram(storage) -> None:
    """A restore from originals kept in RAM never holds two copies of them: each encoded weight gets
    its original storage back (the same memory), not a copy of it."""
    model = build_flux(dtype=torch.bfloat16, num_layers=2, num_single_layers=2)
    snap = snapshot(model)
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    s = enable_block_streaming(model, resident=1, storage=storage, device="cpu", copier=SyncCopier())
    encoded = {_full_name(s, pos, name) for pos, kept in s._retained.items() for name in kept}
    assert encoded
    _run(model, flux_inputs(torch.bfloat16))
    s.restore()
    assert_same_as(model, snap)
    after = {name: p.data_ptr() for name, p in model.named_parameters()}
    assert all(after[name] == before[name] for name in encoded)


def test_restore_reads_the_originals_from_the_file_not_through_its_mapping(tmp_path, monkeypatch) -> None:
    """Read through the mapping, the whole file's pages would count in RSS beside the restored
    weights; plain reads leave them to the page cache."""
    model = build_flux(dtype=torch.bfloat16, num_layers=2, num_single_layers=2)
    snap = snapshot(model)
    s = enable_block_streaming(
        model, resident=1, storage="fp8", device="cpu", copier=SyncCopier(), originals="disk", offload_folder=tmp_path
    )
    _run(model, flux_inputs(torch.bfloat16))
    reads = []
    real_read_into = OffloadFile.read_into

    def counting_read_into(self, offset, out):  # type: ignore[no-untyped-def]
        reads.append(offset)
        real_read_into(self, offset, out)

    def no_view(self, offset, nbytes):  # type: ignore[no-untyped-def]
        raise AssertionError("restore read an original through the mapping")

    n_originals = sum(len(kept) for kept in s._retained_at.values())
    assert n_originals
    monkeypatch.setattr(OffloadFile, "read_into", counting_read_into)
    monkeypatch.setattr(OffloadFile, "view", no_view)
    s.restore()
    assert len(reads) == n_originals
    assert_same_as(model, snap)
    assert not list(tmp_path.glob(f"*{OFFLOAD_SUFFIX}"))


@pytest.mark.parametrize("originals", ["ram", "disk"])
def test_a_restore_that_fails_midway_can_be_retried(tmp_path, monkeypatch, originals) -> None:
    import vramkit.engine.streamer as streamer_mod

    model = build_flux(dtype=torch.bfloat16, num_layers=2, num_single_layers=2)
    snap = snapshot(model)
    s = enable_block_streaming(
        model,
        resident=1,
        storage="fp8",
        device="cpu",
        copier=SyncCopier(),
        originals=originals,
        offload_folder=tmp_path,
    )
    real_assign = streamer_mod._assign
    calls = []

    def failing_assign(owners, kind, value):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure while restoring")
        real_assign(owners, kind, value)

    monkeypatch.setattr(streamer_mod, "_assign", failing_assign)
    with pytest.raises(RuntimeError, match="simulated"):
        s.restore()
    monkeypatch.setattr(streamer_mod, "_assign", real_assign)
    s.restore()
    assert_same_as(model, snap)
    assert_no_hooks(model)
