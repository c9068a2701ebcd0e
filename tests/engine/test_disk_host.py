"""Streaming from a memory-mapped offload file (``host="disk"``): bit-identical output, host storage
that is file-backed (page cache, not anonymous memory), exact restore and no file left behind."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from streaming_models import assert_no_hooks, assert_same_as, build_flux, build_t5, flux_inputs, snapshot

from vramkit.engine import BlockStreamer, CheckingCopier, SyncCopier, compute_layout, enable_block_streaming
from vramkit.engine.host import OFFLOAD_SUFFIX, OffloadFile
from vramkit.errors import InvalidRequestError

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def _run(model: torch.nn.Module, inputs: dict, n: int = 1) -> list[torch.Tensor]:  # type: ignore[type-arg]
    with torch.inference_mode():
        return [model(**inputs)[0].clone() for _ in range(n)]


def _mapped_from(path: str | Path) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from ``path`` (Linux)."""
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            if line.rstrip().endswith(str(path)):
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def _file_backed(t: torch.Tensor, path: str | Path) -> bool:
    ranges = _mapped_from(path)
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    return any(lo <= start and end <= hi for lo, hi in ranges)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("resident", "prefetch"), [(0, 1), (2, 1), (1, 3)])
def test_disk_host_is_bit_identical_and_restored(tmp_path, dtype, resident, prefetch) -> None:
    model = build_flux(dtype=dtype, num_layers=3, num_single_layers=4)
    inputs = flux_inputs(dtype)
    (ref,) = _run(model, inputs)
    snap = snapshot(model)
    folder = tmp_path / "offload" / "nested"
    s = enable_block_streaming(
        model,
        resident=resident,
        prefetch=prefetch,
        device="cpu",
        copier=CheckingCopier("lazy"),
        host="disk",
        offload_folder=folder,
    )
    path = Path(s.summary()["offload_file"])
    assert path.parent == folder and path.name.endswith(OFFLOAD_SUFFIX) and path.is_file()
    streamed = 7 - resident
    assert s.summary()["file_nbytes_actual"] == s.layout.streamed_nbytes > 0
    assert s.pinned_nbytes == s.pageable_nbytes == 0
    assert len(s._host) == streamed
    for out in _run(model, inputs, 2):
        assert torch.equal(out, ref)
    s.restore()
    assert_same_as(model, snap)
    assert_no_hooks(model)
    assert not path.exists() and not folder.exists() and not (tmp_path / "offload").exists()
    assert tmp_path.exists()
    (after,) = _run(model, inputs)
    assert torch.equal(after, ref)


@linux_only
def test_streamed_blocks_are_memory_mapped_not_anonymous(tmp_path) -> None:
    model = build_flux(dtype=torch.bfloat16)
    s = enable_block_streaming(model, resident=1, device="cpu", host="disk", offload_folder=tmp_path)
    path = s.summary()["offload_file"]
    assert _mapped_from(path), "the offload file is not mapped"
    for host in s._host.values():
        assert not host.pinned
        assert _file_backed(host.tensor, path), "a streamed block's host storage is not the mapped file"
    s.restore()
    assert not _mapped_from(path)
    assert not os.listdir(tmp_path)


@linux_only
@pytest.mark.parametrize("storage", ["fp8", "int8"])
def test_lossy_storage_keeps_its_originals_in_the_file_and_restores_exactly(tmp_path, storage) -> None:
    model = build_flux(dtype=torch.bfloat16)
    snap = snapshot(model)
    s = enable_block_streaming(
        model, resident=2, storage=storage, device="cpu", copier=CheckingCopier(), host="disk", offload_folder=tmp_path
    )
    path = s.summary()["offload_file"]
    # Both the streamed and the resident encoded blocks keep their originals in the file, not in RAM.
    assert s.originals == "disk" and not s._retained
    assert len(s._retained_at) == len(s.layout.blocks)
    size = os.path.getsize(path)
    spans = sorted(
        (off, off + math.prod(shape) * dtype.itemsize)
        for kept in s._retained_at.values()
        for off, dtype, shape in kept.values()
    )
    # Every original has its own bytes inside the file (restored from there below, exactly).
    assert all(end <= size for _, end in spans)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    _run(model, flux_inputs(torch.bfloat16))
    s.restore()
    assert_same_as(model, snap)
    assert not os.listdir(tmp_path)


def test_t5_streams_from_disk_bit_identical(tmp_path) -> None:
    model = build_t5()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(input_ids=ids).last_hidden_state.clone()
    snap = snapshot(model)
    s = enable_block_streaming(
        model, resident=1, device="cpu", copier=CheckingCopier(), host="disk", offload_folder=tmp_path
    )
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).last_hidden_state, ref)
    s.restore()
    assert_same_as(model, snap)


class _DictSource:
    """A weight source backed by a state dict (what vramkit.load does with a safetensors file)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        self.reads: list[str] = []

    def get(self, name: str, device: torch.device) -> torch.Tensor:
        self.reads.append(name)
        return self.state[name].to(device)


def test_meta_module_streams_from_a_source_and_restores_to_cpu(tmp_path) -> None:
    from accelerate import init_empty_weights

    from vramkit.engine.blocks import find_block_stacks

    real = build_flux(dtype=torch.bfloat16)
    inputs = flux_inputs(torch.bfloat16)
    (ref,) = _run(real, inputs)
    state = {k: v.clone() for k, v in real.state_dict().items()}
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        meta = FluxTransformer2DModel.from_config(real.config).to(torch.bfloat16)
    meta.eval().requires_grad_(False)
    assert all(p.device.type == "meta" for p in meta.parameters())
    source = _DictSource(state)
    s = enable_block_streaming(
        meta, resident=1, device="cpu", copier=CheckingCopier(), host="disk", offload_folder=tmp_path, source=source
    )
    assert sorted(set(source.reads)) == sorted(n for n, _ in meta.named_parameters())
    assert len(source.reads) == len(set(source.reads)), "every tensor is read once"
    assert find_block_stacks(meta)
    (out,) = _run(meta, inputs)
    assert torch.equal(out, ref)
    s.restore()
    for name, p in meta.named_parameters():
        assert p.device.type == "cpu" and torch.equal(p, state[name]), name
    assert not os.listdir(tmp_path)
    (after,) = _run(meta, inputs)
    assert torch.equal(after, ref)


def test_meta_module_without_a_source_is_refused_and_left_alone(tmp_path) -> None:
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    real = build_flux()
    with init_empty_weights():
        meta = FluxTransformer2DModel.from_config(real.config)
    with pytest.raises(InvalidRequestError, match="meta device"):
        enable_block_streaming(meta, resident=1, device="cpu", host="disk", offload_folder=tmp_path)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert_no_hooks(meta)
    assert not os.listdir(tmp_path)


def test_failure_during_start_rolls_back_and_deletes_the_file(tmp_path) -> None:
    model = build_flux()
    snap = snapshot(model)
    layout = compute_layout(model, resident=1)
    streamer = BlockStreamer(model, layout, device="cpu", copier=SyncCopier(), host="disk", offload_folder=tmp_path)

    def explode() -> None:
        raise RuntimeError("simulated failure while hooking")

    streamer._install_hooks = explode  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="simulated"):
        streamer.start()
    assert_same_as(model, snap)
    assert_no_hooks(model)
    assert not os.listdir(tmp_path)


def test_bad_host_and_unwritable_folder_are_refused(tmp_path) -> None:
    model = build_flux()
    with pytest.raises(InvalidRequestError, match="host="):
        BlockStreamer(model, compute_layout(model, resident=1), device="cpu", host="ssd")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    snap = snapshot(model)
    with pytest.raises(InvalidRequestError, match="offload folder"):
        enable_block_streaming(model, resident=1, device="cpu", host="disk", offload_folder=blocker / "sub")
    assert_same_as(model, snap)


def test_offload_file_appends_page_aligned_and_cleans_up(tmp_path) -> None:
    f = OffloadFile(tmp_path / "x", "T")
    a = f.append(torch.arange(10, dtype=torch.bfloat16))
    b = f.append(torch.ones(3, dtype=torch.float32))
    assert a == 0 and b == 4096
    whole = f.map()
    assert torch.equal(f.view(a, 20).view(torch.bfloat16), torch.arange(10, dtype=torch.bfloat16))
    assert torch.equal(f.view(b, 12).view(torch.float32), torch.ones(3))
    assert whole.numel() == 4096 + 12
    f.close()
    f.close()
    assert not (tmp_path / "x").exists()
