"""Quantization arithmetic shared by QAT, sensitivity analysis and the real int formats.

Conventions (used everywhere in fastcap.quant):

* Weights: symmetric, per output channel (``axis=0``: Linear rows, Conv output filters,
  Embedding rows, MultiheadAttention projection rows). int8 codes live in [-127, 127] and
  int4 codes in [-7, 7]. The grids are symmetric (no -128 / -8) so that the scale is simply
  ``amax / qmax`` and negating a weight negates its code exactly; the lost level costs
  < 1 % of int8 resolution and ~6 % of int4 resolution, which is cheaper than the bias a
  lopsided grid puts on weights that are roughly symmetric around zero.
* Activations: per-tensor, ASYMMETRIC (affine, unsigned codes in [0, 2**bits - 1] with a
  zero point). Inputs of most layers follow a ReLU/GELU or a LayerNorm with a learned
  shift, so they are far from symmetric; an affine grid wastes no levels on the empty side.
  The range is always widened to contain 0 so that zero (conv padding, ReLU zeros) is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

WEIGHT_BITS = (4, 8)  # integer widths with a real storage format
SUPPORTED_BITS = (4, 8, 16)  # 16 = keep the layer in floating point


def check_bits(bits: int, allowed: tuple[int, ...] = SUPPORTED_BITS) -> int:
    """Return ``bits`` as an int or raise ``ValueError`` if it is not one of ``allowed``."""
    if isinstance(bits, bool) or int(bits) != bits or int(bits) not in allowed:
        raise ValueError(
            f"unsupported bit width {bits!r}: fastcap.quant supports {', '.join(map(str, allowed))} "
            "(4 and 8 are stored as integers, 16 keeps the layer in floating point)"
        )
    return int(bits)


def qmax(bits: int) -> int:
    """Largest code of the symmetric weight grid: 127 for int8, 7 for int4."""
    return 2 ** (check_bits(bits, WEIGHT_BITS) - 1) - 1


def _reduce_dims(ndim: int, axis: int) -> list[int]:
    axis = axis % ndim
    return [d for d in range(ndim) if d != axis]


def weight_scales(w: Tensor, bits: int, axis: int = 0) -> Tensor:
    """Per-channel scales ``amax / qmax`` (float32, shape ``[w.shape[axis]]``)."""
    w = w.detach().float()
    if w.ndim == 1:
        amax = w.abs()
    else:
        amax = w.abs().amax(dim=_reduce_dims(w.ndim, axis))
    # An all-zero channel would give scale 0 and NaN codes; any positive scale encodes it as 0.
    return torch.where(amax > 0, amax / qmax(bits), torch.ones_like(amax))


def _bcast(scales: Tensor, ndim: int, axis: int) -> Tensor:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return scales.reshape(shape)


def quantize_weight(w: Tensor, bits: int, axis: int = 0) -> tuple[Tensor, Tensor]:
    """Symmetric per-channel quantization.

    Returns ``(codes, scales)``: ``codes`` is ``torch.int8`` with ``w``'s shape (int4 codes are
    NOT packed here, see :func:`fastcap.quant.pack.pack_int4`), ``scales`` is float32 with one
    entry per index of ``axis``. ``w ≈ codes * scales`` (broadcast along ``axis``).
    """
    q = qmax(bits)
    scales = weight_scales(w, bits, axis)
    codes = torch.round(w.detach().float() / _bcast(scales, w.ndim, axis)).clamp_(-q, q)
    return codes.to(torch.int8), scales


def dequantize_weight(codes: Tensor, scales: Tensor, axis: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_weight` (codes must be unpacked)."""
    return (codes.to(torch.float32) * _bcast(scales.float(), codes.ndim, axis)).to(dtype)


def fake_quant_weight(w: Tensor, bits: int, axis: int = 0) -> Tensor:
    """Quantize-dequantize ``w`` with a straight-through estimator.

    Forward returns the value on the integer grid; backward passes the gradient to ``w``
    unchanged. Because the scale is the channel's absmax, every weight is inside the range, so
    there is no clipping region whose gradient would have to be masked. ``bits >= 16`` is the
    identity.
    """
    if check_bits(bits) == 16:
        return w
    codes, scales = quantize_weight(w, bits, axis)
    wq = dequantize_weight(codes, scales, axis, w.dtype)
    return w + (wq - w).detach()


def fake_quant_lastdim(x: Tensor, bits: int) -> Tensor:
    """STE fake quantization with one scale per vector along the last dimension.

    Used for embedding lookups: gathering rows and quantizing them is identical to quantizing
    the whole table per row (the scale of a row depends only on that row) and far cheaper for a
    large vocabulary.
    """
    if check_bits(bits) == 16:
        return x
    q = qmax(bits)
    amax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    s = torch.where(amax > 0, amax / q, torch.ones_like(amax))
    xq = (torch.round(x.detach().float() / s).clamp_(-q, q) * s).to(x.dtype)
    return x + (xq - x).detach()


def act_qparams(lo: Tensor, hi: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Affine per-tensor parameters for an observed range: ``(scale, zero_point)`` tensors.

    The range is widened to contain 0 so that 0 maps to an exact code.
    """
    levels = 2 ** int(bits) - 1
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    scale = torch.clamp((hi - lo) / levels, min=1e-8)
    zp = torch.clamp(torch.round(-lo / scale), 0, levels)
    return scale, zp


def fake_quant_act(x: Tensor, lo: Tensor, hi: Tensor, bits: int = 8) -> Tensor:
    """Asymmetric per-tensor fake quantization with a clipped straight-through estimator.

    Inside the representable range the gradient passes unchanged; outside it is zero (the
    output is clamped there, so the true derivative is zero too).
    """
    levels = 2 ** int(bits) - 1
    scale, zp = act_qparams(lo, hi, bits)
    xmin = (0 - zp) * scale
    xmax = (levels - zp) * scale
    xf = x.float()
    xc = torch.maximum(torch.minimum(xf, xmax), xmin)
    xq = (torch.clamp(torch.round(xf / scale) + zp, 0, levels) - zp) * scale
    return (xc + (xq - xc).detach()).to(x.dtype)
