"""How a tensor is stored in a packed block ("codec") and turned back into its compute dtype.

- ``raw``: the tensor's own bytes; unpacking is a view, bit-exact.
- ``cast``: a narrower float dtype (an fp32 tensor stored as bf16/fp16), cast back on unpacking.
- ``fp8``: float8_e4m3fn with one fp32 scale per output row (``row_max / 448``), for the weights of
  ``nn.Linear`` layers. Per-row scaling keeps small weights out of fp8's subnormal range, where an
  unscaled cast (diffusers' layerwise casting) loses most of their bits.
- ``int8``: symmetric int8 with one fp32 scale per output row (``row_max / 127``).

Decoding is one or two elementwise kernels per tensor on the compute device; the fp32 scale
multiplies in fp32 and the result is rounded once to the compute dtype.
"""

from __future__ import annotations

import torch

__all__ = [
    "CODECS",
    "FP8_DTYPE",
    "FP8_MAX",
    "INT8_MAX",
    "quantize_rows",
    "dequantize_rows",
    "decode_into",
    "stored_dtype_for",
]

CODECS = ("raw", "cast", "fp8", "int8")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
SCALE_DTYPE = torch.float32


def stored_dtype_for(codec: str, dtype: torch.dtype, storage_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor of ``dtype`` has in the packed buffer under ``codec``."""
    if codec == "raw":
        return dtype
    if codec == "cast":
        if storage_dtype is None:
            raise ValueError("the cast codec needs a storage dtype")
        return storage_dtype
    if codec == "fp8":
        return FP8_DTYPE
    if codec == "int8":
        return torch.int8
    raise ValueError(f"unknown codec {codec!r}")


def quantize_rows(weight: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight ``[out, in]`` per output row; returns ``(q, scale)`` on its device.

    ``scale`` is fp32 ``[out]``; an all-zero row gets scale 1 (its codes are all zero anyway).
    """
    if weight.dim() != 2:
        raise ValueError(f"per-row quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    qmax = FP8_MAX if codec == "fp8" else INT8_MAX
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=1)
    scale = amax / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = w / scale.unsqueeze(1)
    if codec == "fp8":
        # Rounding can push |x| a hair above 448; e4m3fn has no infinity, so clamp first.
        q = scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    elif codec == "int8":
        q = scaled.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        raise ValueError(f"quantize_rows: codec must be 'fp8' or 'int8', got {codec!r}")
    return q, scale.to(SCALE_DTYPE)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor of ``dtype`` from per-row codes and scales (reference path for tests)."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    decode_into(out, q, scale, "fp8" if q.dtype == FP8_DTYPE else "int8")
    return out


def decode_into(out: torch.Tensor, stored: torch.Tensor, scale: torch.Tensor | None, codec: str) -> None:
    """Write the compute-dtype values of ``stored`` (and ``scale``) into ``out`` (same shape)."""
    if codec in ("raw", "cast"):
        out.copy_(stored)
    elif codec == "int8":
        assert scale is not None
        # int8 * fp32 promotes to fp32 inside the kernel; the result is rounded once into ``out``.
        torch.mul(stored, scale.unsqueeze(1), out=out)
    elif codec == "fp8":
        assert scale is not None
        # torch has no type promotion for float8 operands, so: exact upcast (e4m3 fits in
        # bf16/fp16/fp32), then an in-place multiply computed in fp32 and rounded once.
        out.copy_(stored)
        out.mul_(scale.unsqueeze(1))
    else:
        raise ValueError(f"unknown codec {codec!r}")
