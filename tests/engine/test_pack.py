"""Packing a block into one buffer and getting its tensors back: bit-exact raw, bounded lossy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from streaming_models import build_flux, build_t5

from vramkit.engine import compute_layout, dequantize_rows, pack_block, quantize_rows, unpack_block
from vramkit.engine.codec import FP8_MAX, INT8_MAX
from vramkit.engine.layout import block_tensor_map


def _tensors(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t for name, (_, t, _) in block_tensor_map(block).items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_pack_unpack_bit_exact(dtype: torch.dtype) -> None:
    model = build_flux(dtype=dtype)
    # Make every value distinctive, NaN/inf and signed zeros included: views must be bit-exact.
    with torch.no_grad():
        w = model.transformer_blocks[0].attn.to_q.weight
        w[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, float("-inf")], dtype=dtype)
    layout = compute_layout(model, resident=0)
    for b in layout.blocks:
        block = getattr(model, b.stack)[b.index]
        originals = _tensors(block)
        buf = torch.full((b.nbytes,), 0xAB, dtype=torch.uint8)
        pack_block(originals, b, buf)
        views = unpack_block(buf, b)
        assert views.keys() == originals.keys()
        for name, t in originals.items():
            v = views[name]
            assert v.dtype == t.dtype and v.shape == t.shape
            assert torch.equal(_bits(v), _bits(t)), name
            # A view into the buffer, not a copy.
            assert buf.data_ptr() <= v.data_ptr() < buf.data_ptr() + b.nbytes


def test_pack_mixed_dtypes_t5() -> None:
    model = build_t5()
    # T5 keeps its FF output projection in fp32 next to bf16 weights: mixed dtypes in one buffer.
    model.to(torch.bfloat16)
    for block in model.encoder.block:
        block.layer[-1].DenseReluDense.wo.to(torch.float32)
    layout = compute_layout(model, resident=0)
    for b in layout.blocks:
        block = model.encoder.block[b.index]
        originals = _tensors(block)
        assert {t.dtype for t in originals.values()} == {torch.bfloat16, torch.float32}
        buf = torch.empty(b.nbytes, dtype=torch.uint8)
        pack_block(originals, b, buf)
        views = unpack_block(buf, b)
        for name, t in originals.items():
            assert torch.equal(_bits(views[name]), _bits(t)), name


def test_cast_storage_round_trip() -> None:
    model = build_flux(dtype=torch.float32)
    layout = compute_layout(model, resident=0, storage="bf16")
    b = layout.blocks[0]
    originals = _tensors(model.transformer_blocks[0])
    buf = torch.empty(b.nbytes, dtype=torch.uint8)
    pack_block(originals, b, buf)
    views = unpack_block(buf, b)
    for name, t in originals.items():
        assert views[name].dtype == torch.float32
        assert torch.equal(views[name], t.to(torch.bfloat16).to(torch.float32)), name


@pytest.mark.parametrize("codec", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_lossy_block_round_trip(codec: str, dtype: torch.dtype) -> None:
    model = build_flux(dtype=dtype)
    layout = compute_layout(model, resident=0, storage=codec)
    for b in layout.blocks:
        block = getattr(model, b.stack)[b.index]
        originals = _tensors(block)
        buf = torch.empty(b.nbytes, dtype=torch.uint8)
        pack_block(originals, b, buf)
        views = unpack_block(buf, b)
        for e in b.entries:
            t, v = originals[e.name], views[e.name]
            assert v.dtype == t.dtype and v.shape == t.shape
            if e.codec == "raw":
                assert torch.equal(_bits(v), _bits(t))
            else:
                _assert_within_tolerance(t, v, codec)


def _assert_within_tolerance(w: torch.Tensor, out: torch.Tensor, codec: str) -> None:
    """The stated tolerance, per element, with ``s = row_max / qmax`` the row's scale:

    - int8: |err| <= s/2 (rounding to the nearest code) + the output dtype's rounding;
    - fp8 (e4m3, 3 mantissa bits): |err| <= 2**-4 |w| (half an ulp) + 2**-10 s (subnormal step
      of the scaled value) + the output dtype's rounding.
    """
    w32, o32 = w.float(), out.float()
    amax = w32.abs().amax(dim=1, keepdim=True)
    s = torch.where(amax > 0, amax / (FP8_MAX if codec == "fp8" else INT8_MAX), torch.ones_like(amax))
    eps = torch.finfo(w.dtype).eps if w.dtype != torch.float32 else 0.0
    round_out = eps * o32.abs() + torch.finfo(w.dtype).tiny
    if codec == "int8":
        bound = s / 2 + round_out
    else:
        bound = 2**-4 * w32.abs() + 2**-10 * s + round_out
    err = (o32 - w32).abs()
    assert bool((err <= bound * 1.0001).all()), float((err - bound).max())


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 33),
    scale=st.floats(1e-6, 1e3),
    seed=st.integers(0, 2**16),
    codec=st.sampled_from(["fp8", "int8"]),
)
def test_quantize_rows_tolerance(rows: int, cols: int, scale: float, seed: int, codec: str) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale
    w[0] = 0.0  # an all-zero row
    q, s = quantize_rows(w, codec)
    assert q.dtype == (torch.float8_e4m3fn if codec == "fp8" else torch.int8)
    assert s.dtype == torch.float32 and s.shape == (rows,)
    assert bool(torch.isfinite(q.float()).all())
    out = dequantize_rows(q, s, torch.float32)
    assert torch.equal(out[0], torch.zeros(cols))
    _assert_within_tolerance(w, out, codec)


def test_pack_needs_a_big_enough_byte_buffer() -> None:
    model = build_flux()
    b = compute_layout(model, resident=0).blocks[0]
    with pytest.raises(ValueError):
        pack_block(_tensors(model.transformer_blocks[0]), b, torch.empty(b.nbytes - 1, dtype=torch.uint8))
    with pytest.raises(ValueError):
        pack_block(_tensors(model.transformer_blocks[0]), b, torch.empty(b.nbytes, dtype=torch.float32))


@pytest.mark.parametrize("codec", ["fp8", "int8"])
def test_row_dequantizer_falls_back_to_pytorch_off_gpu(codec: str) -> None:
    from vramkit.engine.codec import decode_into
    from vramkit.engine.kernels import RowDequantizer

    w = torch.randn(7, 13)
    q, s = quantize_rows(w, codec)
    want, got = torch.empty(7, 13, dtype=torch.bfloat16), torch.empty(7, 13, dtype=torch.bfloat16)
    decode_into(want, q, s, codec)
    dec = RowDequantizer()
    dec(got, q, s, codec)
    assert torch.equal(got, want)
    assert (dec.fused_calls, dec.fallback_calls) == (0, 1)
    raw = torch.empty(3)
    dec(raw, torch.ones(3), None, "raw")
    assert torch.equal(raw, torch.ones(3)) and dec.fallback_calls == 1
