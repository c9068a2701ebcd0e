"""The StreamingLayout: offsets, sizes, alignment, slots, scratch, pinned/pageable split."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import init_empty_weights
from streaming_models import build_flux, build_t5

from vramkit.engine import ALIGNMENT, compute_layout, max_resident_for_budget
from vramkit.engine.layout import block_entries
from vramkit.errors import InvalidRequestError, PlanInfeasibleError, UnsupportedPipelineError


def _check_block(block) -> None:  # type: ignore[no-untyped-def]
    spans = []
    for e in block.entries:
        assert e.offset % ALIGNMENT == 0
        assert e.nbytes == e.numel * e.stored_dtype.itemsize
        spans.append((e.offset, e.offset + e.nbytes))
        if e.scale_offset >= 0:
            assert e.scale_offset % ALIGNMENT == 0
            assert e.scale_nbytes == e.shape[0] * 4
            spans.append((e.scale_offset, e.scale_offset + e.scale_nbytes))
    spans.sort()
    for (_, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 <= b0, "packed tensors overlap"
    assert spans[-1][1] <= block.nbytes
    assert block.nbytes % ALIGNMENT == 0
    if block.encoded:
        scr = sorted((e.scratch_offset, e.scratch_offset + e.decoded_nbytes) for e in block.entries)
        assert all(s % ALIGNMENT == 0 for s, _ in scr)
        for (_, a1), (b0, _) in zip(scr, scr[1:]):
            assert a1 <= b0
        assert scr[-1][1] <= block.scratch_nbytes
    else:
        assert all(e.scratch_offset == -1 for e in block.entries)
        assert block.scratch_nbytes == 0


@pytest.mark.parametrize("storage", [None, "bf16", "fp16", "fp8", "int8"])
def test_offsets_aligned_and_disjoint(storage: str | None) -> None:
    model = build_flux()
    layout = compute_layout(model, resident=2, storage=storage)
    for b in layout.blocks:
        _check_block(b)


def test_sizes_and_slots() -> None:
    model = build_flux(num_layers=2, num_single_layers=3)
    layout = compute_layout(model, resident=2, prefetch=1)
    assert layout.resident_positions == (1, 3)
    assert layout.streamed_positions == (0, 2, 4)
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    assert layout.original_nbytes == total
    for b in layout.blocks:
        stack = getattr(model, b.stack)
        assert b.original_nbytes == sum(p.numel() * p.element_size() for p in stack[b.index].parameters())
    assert layout.slot_nbytes == max(layout.blocks[p].nbytes for p in (0, 2, 4))
    assert layout.num_slots == 2
    assert layout.ring_nbytes == 2 * layout.slot_nbytes
    assert layout.streamed_nbytes == sum(layout.blocks[p].nbytes for p in (0, 2, 4))
    assert layout.resident_nbytes == sum(layout.blocks[p].original_nbytes for p in (1, 3))
    assert layout.device_nbytes == layout.rest_nbytes + layout.resident_nbytes + layout.ring_nbytes
    assert layout.scratch_nbytes == 0
    assert layout.lossless
    # Fewer streamed blocks than prefetch + 1: one slot each, never more.
    assert compute_layout(model, resident=4, prefetch=3).num_slots == 1
    assert compute_layout(model, resident=5).num_slots == 0
    assert compute_layout(model, resident=0, prefetch=3).num_slots == 4
    # Explicit positions work too.
    assert compute_layout(model, resident=[0, 4]).resident_positions == (0, 4)
    with pytest.raises(InvalidRequestError):
        compute_layout(model, resident=[7])
    with pytest.raises(InvalidRequestError):
        compute_layout(model, prefetch=0)
    with pytest.raises(InvalidRequestError):
        compute_layout(model, storage="fp4")


def test_lossy_storage_sizes() -> None:
    model = build_flux(dtype=torch.bfloat16)
    raw = compute_layout(model, resident=0)
    fp8 = compute_layout(model, resident=0, storage="fp8")
    for rb, fb in zip(raw.blocks, fp8.blocks):
        linear = [e for e in fb.entries if e.codec == "fp8"]
        assert linear, "every Flux block has Linear weights"
        for e in fb.entries:
            if e.codec == "fp8":
                assert e.stored_dtype == torch.float8_e4m3fn and len(e.shape) == 2 and e.dtype == torch.bfloat16
            else:
                assert e.stored_dtype == e.dtype
        assert fb.encoded and fb.scratch_nbytes >= rb.original_nbytes
        assert fb.nbytes < rb.nbytes
    assert not fp8.lossless
    assert fp8.scratch_nbytes == max(b.scratch_nbytes for b in fp8.blocks)
    assert fp8.retained_nbytes == sum(e.decoded_nbytes for b in fp8.blocks for e in b.entries if e.codec != "raw")
    # bf16 storage of a bf16 model changes nothing; of an fp32 model it halves the floats.
    assert compute_layout(model, storage="bf16").lossless
    fp32 = compute_layout(build_flux(), resident=0, storage="bf16")
    assert all(e.codec == "cast" and e.stored_dtype == torch.bfloat16 for b in fp32.blocks for e in b.entries)


def test_pinned_limit_split() -> None:
    model = build_flux(num_layers=2, num_single_layers=3)
    full = compute_layout(model, resident=0)
    sizes = [b.nbytes for b in full.blocks]
    assert full.pinned_nbytes == sum(sizes) and full.pageable_nbytes == 0 and not full.notes
    limit = sizes[0] + sizes[1] + 1
    split = compute_layout(model, resident=0, pinned_limit=limit)
    pinned = [b.position for b in split.blocks if b.pinned]
    # Greedy in execution order; a later smaller block still goes in if it fits.
    expected, used = [], 0
    for pos, n in enumerate(sizes):
        if used + n <= limit:
            expected.append(pos)
            used += n
    assert pinned == expected
    assert split.pinned_nbytes == used <= limit
    assert split.pinned_nbytes + split.pageable_nbytes == split.streamed_nbytes
    assert split.notes and "pageable" in split.notes[0]
    none = compute_layout(model, resident=0, pinned_limit=0)
    assert none.pinned_nbytes == 0 and none.pageable_nbytes == none.streamed_nbytes
    # Resident blocks are never pinned host buffers.
    assert not any(b.pinned for b in compute_layout(model, resident=5, pinned_limit=None).blocks)


def test_meta_model_layout_matches_real() -> None:
    real = compute_layout(build_flux(), resident=2, storage="int8")
    with init_empty_weights():
        meta_model = build_flux()
    meta = compute_layout(meta_model, resident=2, storage="int8")
    assert meta == real


def test_full_size_flux_on_meta() -> None:
    from vramkit.memory.architectures import build_architecture

    model = build_architecture("flux-dev")  # meta device, bf16
    layout = compute_layout(model, resident=0)
    double, single = layout.blocks[0], layout.blocks[19]
    assert math.isclose(double.original_nbytes / 2, 339.8e6, rel_tol=1e-3)
    assert math.isclose(single.original_nbytes / 2, 141.6e6, rel_tol=1e-3)
    assert math.isclose(layout.rest_nbytes / 2, 64.1e6, rel_tol=2e-3)
    assert math.isclose(layout.original_nbytes / 2, 11.90e9, rel_tol=1e-3)
    assert layout.slot_nbytes == double.nbytes and double.nbytes - double.original_nbytes < 64 * ALIGNMENT
    # A 12 GiB weight budget keeps about half the blocks; fp8 keeps more of them.
    bf16 = max_resident_for_budget(model, 12 * 2**30)
    fp8 = max_resident_for_budget(model, 12 * 2**30, storage="fp8")
    assert bf16.device_nbytes <= 12 * 2**30 and 20 < len(bf16.resident_positions) < 40
    assert len(fp8.resident_positions) == 57
    with pytest.raises(PlanInfeasibleError) as info:
        max_resident_for_budget(model, 2**30)
    assert info.value.minimum_vram == compute_layout(model, resident=0).device_nbytes


def test_max_resident_for_budget_is_the_largest_that_fits() -> None:
    model = build_flux(num_layers=3, num_single_layers=4)
    for budget in range(60_000, 400_000, 7_000):
        try:
            best = max_resident_for_budget(model, budget, prefetch=2)
        except PlanInfeasibleError:
            assert compute_layout(model, resident=0, prefetch=2).device_nbytes > budget
            continue
        r = len(best.resident_positions)
        assert best.device_nbytes <= budget
        assert all(compute_layout(model, resident=k, prefetch=2).device_nbytes > budget for k in range(r + 1, 8))


def test_shared_tensor_between_blocks_is_refused() -> None:
    model = build_flux()
    model.single_transformer_blocks[1].proj_out.weight = model.single_transformer_blocks[0].proj_out.weight
    with pytest.raises(UnsupportedPipelineError):
        compute_layout(model)


def test_alias_inside_a_block_is_packed_once() -> None:
    block = build_flux().single_transformer_blocks[0]
    block.register_buffer("extra", torch.arange(4.0))
    block.norm.register_buffer("extra_alias", block.extra)
    entries, _, _, _ = block_entries(block)
    names = [e.name for e in entries]
    assert "extra" in names and "norm.extra_alias" not in names
    (extra,) = [e for e in entries if e.name == "extra"]
    assert extra.aliases == ("norm.extra_alias",) and extra.kind == "buffer"


def test_unknown_module_is_refused() -> None:
    with pytest.raises(UnsupportedPipelineError):
        compute_layout(torch.nn.Linear(4, 4))


def test_t5_layout() -> None:
    layout = compute_layout(build_t5(num_layers=4), resident=1)
    assert layout.stacks == (("encoder.block", 4),)
    assert len(layout.streamed_positions) == 3
