"""The engine on a real GPU (skipped without CUDA): side-stream copies with events, pinned host
buffers, bit-identical outputs, exact restore, and no host synchronization inside a step.

Run on the GPU machine: ``PYTHONPATH=src:/tmp/site python3 -m pytest tests/engine/test_cuda.py -q``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from streaming_models import assert_no_hooks, assert_same_as, build_flux, snapshot

from vramkit.engine import CudaStreamCopier, HostBuffer, enable_block_streaming

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Wider than the CPU tests' model so that copies take long enough to race with compute.
WIDE = dict(num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=8)


def _inputs(dtype: torch.dtype, device: str = "cuda") -> dict:  # type: ignore[type-arg]
    g = torch.Generator().manual_seed(11)
    n_img, n_txt = 256, 32
    return dict(
        hidden_states=torch.randn(1, n_img, 16, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, n_txt, 32, generator=g).to(device, dtype),
        pooled_projections=torch.randn(1, 32, generator=g).to(device, dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        img_ids=torch.zeros(n_img, 3, device=device, dtype=dtype),
        txt_ids=torch.zeros(n_txt, 3, device=device, dtype=dtype),
        return_dict=False,
    )


def _wide(dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    return build_flux(dtype=dtype, axes_dims_rope=(16, 24, 24), **WIDE)


def _run(model: torch.nn.Module, inputs: dict, n: int = 1) -> list[torch.Tensor]:  # type: ignore[type-arg]
    with torch.inference_mode():
        outs = [model(**inputs)[0] for _ in range(n)]
    torch.cuda.synchronize()
    return outs


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_host_buffer_registration() -> None:
    buf = HostBuffer(10_000_123, pin=True)
    # Registered memory is page-locked for the driver (async copies), although PyTorch's
    # is_pinned() only recognises its own pinned allocator's memory.
    assert buf.pinned and buf.tensor.numel() == 10_000_123
    buf.tensor.fill_(7)
    dev = torch.empty(10_000_123, dtype=torch.uint8, device="cuda")
    dev.copy_(buf.tensor, non_blocking=True)
    torch.cuda.synchronize()
    assert int(dev.sum()) == 7 * 10_000_123
    buf.release()
    assert not buf.pinned and buf.tensor.numel() == 0
    small = [HostBuffer(1000, pin=True) for _ in range(8)]  # neighbours must not share pages
    assert all(b.pinned for b in small)
    for b in small:
        b.release()


@pytest.mark.parametrize("resident", [0, 3, 6])
@pytest.mark.parametrize("prefetch", [1, 2])
def test_bit_identical_to_resident_and_restored(resident: int, prefetch: int) -> None:
    model = _wide().to("cuda")
    inputs = _inputs(torch.bfloat16)
    (ref,) = _run(model, inputs)
    model.to("cpu")
    snap = snapshot(model)
    s = enable_block_streaming(model, resident=resident, prefetch=prefetch, device="cuda")
    assert isinstance(s.copier, CudaStreamCopier)
    assert s.pinned_nbytes == s.layout.streamed_nbytes and s.pageable_nbytes == 0
    outs = _run(model, inputs, 6)
    assert all(_bits_equal(o, ref) for o in outs)
    assert s.stats.fallbacks == 0 and s.stats.forwards == 6
    s.restore()
    assert_same_as(model, snap)  # back on the CPU, same values, same parameter objects
    assert_no_hooks(model)


def test_model_on_the_gpu_goes_back_to_the_gpu() -> None:
    model = _wide().to("cuda")
    inputs = _inputs(torch.bfloat16)
    (ref,) = _run(model, inputs)
    snap = snapshot(model)
    s = enable_block_streaming(model, resident=2, device="cuda")
    assert all(_bits_equal(o, ref) for o in _run(model, inputs, 3))
    s.restore()
    assert_same_as(model, snap)


def test_pageable_blocks_under_a_pinned_limit() -> None:
    model = _wide().to("cuda")
    inputs = _inputs(torch.bfloat16)
    (ref,) = _run(model, inputs)
    model.to("cpu")
    from vramkit.engine import compute_layout

    half = compute_layout(model, resident=0).streamed_nbytes // 2
    s = enable_block_streaming(model, resident=0, device="cuda", pinned_limit=half)
    assert 0 < s.pinned_nbytes <= half and s.pageable_nbytes > 0
    assert all(_bits_equal(o, ref) for o in _run(model, inputs, 3))
    s.restore()


@pytest.mark.parametrize("storage", ["fp8", "int8"])
def test_lossy_storage_on_gpu(storage: str) -> None:
    model = _wide().to("cuda")
    inputs = _inputs(torch.bfloat16)
    (ref,) = _run(model, inputs)
    model.to("cpu")
    snap = snapshot(model)
    outs = []
    for resident in (0, 5, 12):
        s = enable_block_streaming(model, resident=resident, storage=storage, device="cuda")
        a, b = _run(model, inputs, 2)
        assert _bits_equal(a, b)
        outs.append(a)
        s.restore()
        assert_same_as(model, snap)
    assert all(_bits_equal(o, outs[0]) for o in outs)
    err = float((outs[0].float() - ref.float()).norm() / ref.float().norm())
    assert 0 < err < (0.1 if storage == "fp8" else 0.03)


def test_no_host_synchronization_inside_a_step() -> None:
    model = _wide().to("cuda")
    inputs = _inputs(torch.bfloat16)

    def count_syncs() -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.inference_mode():
                    model(**inputs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    _run(model, inputs)
    plain = count_syncs()
    model.to("cpu")
    s = enable_block_streaming(model, resident=3, device="cuda")
    _run(model, inputs, 2)  # warm: the first forward primes the ring
    streamed = count_syncs()
    s.restore()
    assert streamed <= plain, f"streaming added {streamed - plain} host synchronizations per step"


def test_strategy_on_a_tiny_pipeline() -> None:
    import vramkit
    from vramkit.strategies import BlockStreaming
    from vramkit.testing import tiny_pipeline
    from vramkit.testing.checks import run_tiny

    pipe = tiny_pipeline("flux").to("cuda")
    ref = run_tiny(pipe, "flux")
    pipe.transformer.to("cpu")
    snap = snapshot(pipe.transformer)
    plan = vramkit.optimize(pipe, strategies=[BlockStreaming(resident=1)])
    assert plan.lossless and plan.steps[0].reason != "no CUDA device: BlockStreaming is a no-op here"
    assert torch.equal(run_tiny(pipe, "flux"), ref)
    assert torch.equal(run_tiny(pipe, "flux"), ref)
    vramkit.restore(pipe)
    assert_same_as(pipe.transformer, snap)
    assert_no_hooks(pipe.transformer)


@pytest.mark.parametrize("codec", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_decode_matches_pytorch(codec: str, dtype: torch.dtype) -> None:
    from vramkit.engine import quantize_rows
    from vramkit.engine.codec import decode_into
    from vramkit.engine.kernels import RowDequantizer

    w = torch.randn(1000, 3000, device="cuda", dtype=dtype) * 0.02
    q, s = quantize_rows(w, codec)
    want = torch.empty_like(w)
    decode_into(want, q, s, codec)
    got = torch.full_like(w, float("nan"))
    dec = RowDequantizer()
    dec(got, q, s, codec)
    assert dec.fused_calls == 1, "the Triton kernel was not used"
    assert torch.equal(got, want)


def test_streamed_fp8_uses_the_fused_kernel_and_matches_pytorch_decode() -> None:
    model = _wide()
    inputs = _inputs(torch.bfloat16)
    s = enable_block_streaming(model, resident=4, storage="fp8", device="cuda")
    (fused,) = _run(model, inputs)
    assert s.decoder.fused_calls > 0 and s.decoder.fallback_calls == 0
    s.restore()
    s = enable_block_streaming(model, resident=4, storage="fp8", device="cuda", fused_decode=False)
    (plain,) = _run(model, inputs)
    s.restore()
    assert _bits_equal(fused, plain)
