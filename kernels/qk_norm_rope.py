"""Fused QK RMSNorm + RoPE: one block's q and k in, normalized and rotated out, in one pass.

    q, k            (B, H, L, D)  float32 / float16 / bfloat16, any strides with a contiguous last dim (the
                                  views a qkv projection gives)
    q_scales, ...   pairs of (D,) learned scales: [0] for tokens < split (text of a double block), [1] after
    cos, sin        (L, D/2) float32
    returns         (q, k) rotated, contiguous (B, H, L, D), the input dtype

Everything is computed in float32 and rounded once; the reference (reference.qk_norm_rope) rounds after the
norm and again after the rotation, as FLUX does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kontext_rt.kernels import _launch
from kontext_rt.kernels._rope_tile import load_angles
from kontext_rt.kernels.reference import EPS

BLOCK_L_GPU = 32  # rows per program: (32, 128) tiles of q and k, memory bound
BLOCK_L_INTERPRET = 128  # the interpreter pays per program, not per element


@triton.jit
def _norm_rope_one(
    x_ptr, out_ptr, stride_l, rows, mask, split, s0_ptr, s1_ptr, cos, sin, eps, HALF: tl.constexpr, BLOCK: tl.constexpr
):
    """Whole rows in and out (contiguous, so the loads and stores vectorize); the pairs are split in registers.
    (Loading the even and odd columns as two strided tiles, as the attention kernel does, made every access a
    2-byte one: 226 GB/s on an H200, 5% of its copy rate.)"""
    cols = tl.arange(0, 2 * HALF)
    x = tl.load(x_ptr + rows[:, None] * stride_l + cols[None, :], mask=mask[:, None], other=0.0)
    dtype = x.dtype
    x = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / (2 * HALF) + eps)[:, None]
    s0 = tl.load(s0_ptr + cols).to(tl.float32)
    s1 = tl.load(s1_ptr + cols).to(tl.float32)
    x = x * rstd * tl.where((rows < split)[:, None], s0[None, :], s1[None, :])
    e, o = tl.split(tl.reshape(x, (BLOCK, HALF, 2)))
    y = tl.reshape(tl.join(e * cos - o * sin, e * sin + o * cos), (BLOCK, 2 * HALF))
    tl.store(out_ptr + rows[:, None] * (2 * HALF) + cols[None, :], y.to(dtype), mask=mask[:, None])


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,  # inputs (B, H, L, D) strided; outputs (B, H, L, D) contiguous
    qs0_ptr,
    qs1_ptr,
    ks0_ptr,
    ks1_ptr,  # (D,) scales before / from `split`
    cos_ptr,
    sin_ptr,  # (L, D/2) float32
    split,
    L,
    H,
    stride_qb,
    stride_qh,
    stride_ql,  # q strides in elements (batch, head, token); the D stride is 1
    stride_kb,
    stride_kh,
    stride_kl,  # k likewise
    eps,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_l * BLOCK + tl.arange(0, BLOCK)
    mask = rows < L
    cos, sin = load_angles(cos_ptr, sin_ptr, rows, mask, HALF)  # shared by q and k
    out_offset = pid_bh.to(tl.int64) * L * (2 * HALF)
    _norm_rope_one(
        q_ptr + b * stride_qb + h * stride_qh,
        q_out_ptr + out_offset,
        stride_ql,
        rows,
        mask,
        split,
        qs0_ptr,
        qs1_ptr,
        cos,
        sin,
        eps,
        HALF,
        BLOCK,
    )
    _norm_rope_one(
        k_ptr + b * stride_kb + h * stride_kh,
        k_out_ptr + out_offset,
        stride_kl,
        rows,
        mask,
        split,
        ks0_ptr,
        ks1_ptr,
        cos,
        sin,
        eps,
        HALF,
        BLOCK,
    )


def _check(q, k, q_scales, k_scales, cos, sin):
    _launch.check_float("q", q)
    _launch.check_float("k", k, q.dtype)
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, L, D), got shape {tuple(q.shape)}")
    B, H, L, D = q.shape
    _launch.check_head_dim(D)
    _launch.check_shape("k", k, (B, H, L, D))
    for name, t in (("q", q), ("k", k)):
        _launch.check_last_dim_contiguous(name, t)
    _launch.check_rope_tables(cos, sin, L, D)
    return _launch.check_scales("q_scales", q_scales, D) + _launch.check_scales("k_scales", k_scales, D)


def qk_norm_rope(q, k, q_scales, k_scales, split: int, cos, sin, *, out=None):
    """(q, k) normalized and rotated; `out` = (q_out, k_out) contiguous buffers to write into (tests poison them)."""
    qs0, qs1, ks0, ks1 = _check(q, k, q_scales, k_scales, cos, sin)
    _launch.check_device(_qk_norm_rope_kernel, q, k, cos, sin, qs0, qs1, ks0, ks1)
    B, H, L, D = q.shape
    if out is None:
        out = (
            torch.empty(B, H, L, D, dtype=q.dtype, device=q.device),
            torch.empty(B, H, L, D, dtype=q.dtype, device=q.device),
        )
    for name, t in zip(("q_out", "k_out"), out, strict=True):
        _launch.check_shape(name, t, (B, H, L, D))
        if not t.is_contiguous() or t.dtype != q.dtype:
            raise ValueError(f"{name} must be a contiguous {q.dtype} tensor")
    if L == 0 or B * H == 0:
        return out
    block = BLOCK_L_INTERPRET if q.device.type == "cpu" else BLOCK_L_GPU
    grid = (triton.cdiv(L, block), B * H)
    _qk_norm_rope_kernel[grid](
        q,
        k,
        out[0],
        out[1],
        qs0,
        qs1,
        ks0,
        ks1,
        cos,
        sin,
        split,
        L,
        H,
        *q.stride()[:3],
        *k.stride()[:3],
        EPS,
        HALF=D // 2,
        BLOCK=block,
        num_warps=4,
    )
    return out


# One op for torch.compile, torch.export and CUDA-graph capture (registered once, when this module is imported).
@torch.library.custom_op("kontext_rt::qk_norm_rope", mutates_args=())
def qk_norm_rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    q_scale0: torch.Tensor,
    q_scale1: torch.Tensor,
    k_scale0: torch.Tensor,
    k_scale1: torch.Tensor,
    split: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return qk_norm_rope(q, k, (q_scale0, q_scale1), (k_scale0, k_scale1), split, cos, sin)


@qk_norm_rope_op.register_fake
def _(q, k, q_scale0, q_scale1, k_scale0, k_scale1, split, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape)
