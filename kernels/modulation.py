"""Fused adaLN modulation and gated residual, the elementwise work around every FLUX projection.

    x, y                (B, L, C)  float32 / float16 / bfloat16, rows may be strided, contiguous last dim
    shift, scale, gate  (B, 1, C)  one vector per sample (chunks of the modulation projection), same dtype
    modulate            -> (1 + scale) * LayerNorm(x) + shift   (LayerNorm without affine, eps 1e-6)
    gated_residual      -> x + gate * y
    both return a contiguous (B, L, C) tensor in x's dtype

One program per token row: the row is read once, its mean and variance taken in float32, and written once,
where torch makes five passes over it (layer_norm, 1 + scale, mul, add, and the casts between).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kontext_rt.kernels import _launch
from kontext_rt.kernels.reference import EPS


@triton.jit
def _modulate_kernel(
    x_ptr,
    shift_ptr,
    scale_ptr,
    out_ptr,  # x (B, L, C) strided rows; shift/scale (B, 1, C); out contiguous
    L,
    C,
    eps,
    stride_xb,
    stride_xl,  # x strides in elements (batch, token); the C stride is 1
    stride_shift_b,
    stride_scale_b,  # batch strides of shift and scale
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(x_ptr + b * stride_xb + (row % L) * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / C
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, 0) / C + eps)
    shift = tl.load(shift_ptr + b * stride_shift_b + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_scale_b + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + row * C + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_kernel(
    x_ptr,
    gate_ptr,
    y_ptr,
    out_ptr,  # x, y (B, L, C) strided rows; gate (B, 1, C); out contiguous
    L,
    C,
    stride_xb,
    stride_xl,
    stride_yb,
    stride_yl,  # x and y strides in elements (batch, token)
    stride_gate_b,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    token = row % L
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(x_ptr + b * stride_xb + token * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * stride_yb + token * stride_yl + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * stride_gate_b + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * C + cols, (x + gate * y).to(out_ptr.dtype.element_ty), mask=mask)


def _check_rows(name, t, dtype, shape=None):
    _launch.check_float(name, t, dtype)
    if t.dim() != 3:
        raise ValueError(f"{name} must be (B, L, C), got shape {tuple(t.shape)}")
    if shape is not None:
        _launch.check_shape(name, t, shape)
    _launch.check_last_dim_contiguous(name, t)


def _check_vector(name, t, dtype, B, C):
    _launch.check_float(name, t, dtype)
    _launch.check_shape(name, t, (B, 1, C))
    _launch.check_last_dim_contiguous(name, t)


def _out(x, out):
    B, L, C = x.shape
    if out is None:
        return torch.empty(B, L, C, dtype=x.dtype, device=x.device)
    _launch.check_shape("out", out, (B, L, C))
    if not out.is_contiguous() or out.dtype != x.dtype:
        raise ValueError(f"out must be a contiguous {x.dtype} tensor")
    return out


def _warps(block_c: int) -> int:
    return max(1, min(16, block_c // 256))  # ~8 elements per thread, at least 1 warp


def modulate(x, shift, scale, *, out=None):
    """(1 + scale) * LayerNorm(x) + shift; `out` a buffer to write into."""
    _check_rows("x", x, None)
    B, L, C = x.shape
    _check_vector("shift", shift, x.dtype, B, C)
    _check_vector("scale", scale, x.dtype, B, C)
    _launch.check_device(_modulate_kernel, x, shift, scale)
    out = _out(x, out)
    if B * L == 0:
        return out
    block = triton.next_power_of_2(C)
    _modulate_kernel[(B * L,)](
        x,
        shift,
        scale,
        out,
        L,
        C,
        EPS,
        x.stride(0),
        x.stride(1),
        shift.stride(0),
        scale.stride(0),
        BLOCK_C=block,
        num_warps=_warps(block),
    )
    return out


def gated_residual(x, gate, y, *, out=None):
    """x + gate * y; `out` a buffer to write into."""
    _check_rows("x", x, None)
    B, L, C = x.shape
    _check_rows("y", y, x.dtype, (B, L, C))
    _check_vector("gate", gate, x.dtype, B, C)
    _launch.check_device(_gated_residual_kernel, x, gate, y)
    out = _out(x, out)
    if B * L == 0:
        return out
    block = triton.next_power_of_2(C)
    _gated_residual_kernel[(B * L,)](
        x,
        gate,
        y,
        out,
        L,
        C,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        gate.stride(0),
        BLOCK_C=block,
        num_warps=_warps(block),
    )
    return out


@torch.library.custom_op("kontext_rt::modulate", mutates_args=())
def modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return modulate(x, shift, scale)


@modulate_op.register_fake
def _(x, shift, scale):
    return x.new_empty(x.shape)


@torch.library.custom_op("kontext_rt::gated_residual", mutates_args=())
def gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return gated_residual(x, gate, y)


@gated_residual_op.register_fake
def _(x, gate, y):
    return x.new_empty(x.shape)
