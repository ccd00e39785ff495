"""Flash attention forward with QK RMSNorm and RoPE applied on load, over the joint [text | target | context]
sequence of a FLUX block.

    q, k, v         (B, H, L, D)  float32 / float16 / bfloat16, any strides with a contiguous last dim
    q_scales, ...   pairs of (D,) learned scales: [0] for tokens < split (text of a double block), [1] after
    cos, sin        (L, D/2) float32
    returns         (B, L, H*D), the layout the output projection reads (no transpose pass)

Each program owns BLOCK_M query rows of one (batch, head): it normalizes and rotates them once, in registers,
then streams the keys and values in BLOCK_N tiles, normalizing and rotating each key tile as it is loaded, with
an online softmax in float32 (exp2, the 1/sqrt(D) scale folded into the exponent). No (L, L) matrix and no
rotated copy of q or k is written to memory. The sequence needs no mask: text, target and context tokens all
attend to each other; only the ragged tail of L past the last full tile is masked.

With norm=False, rope=False it is a plain flash attention (for q and k already rotated by qk_norm_rope).
"""

from __future__ import annotations

import math
import threading

import torch
import triton
import triton.language as tl

from kontext_rt.kernels import _launch
from kontext_rt.kernels._rope_tile import load_angles, load_halves, load_scale_halves, norm_rope_halves
from kontext_rt.kernels.reference import EPS

LOG2E = 1.4426950408889634
BLOCK_INTERPRET = 64  # the interpreter pays ~ms per tile step: few, large tiles


# Autotuned on the GPU: (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim. Chosen from sm_90 compiles
# (cuobjdump register usage): at D=128 a 128-row tile needs 8 warps (4 spill kilobytes), and the norm + RoPE
# path holds both rotated q halves, so BLOCK_N stays at 32-64. tests/test_kernel_compile.py recompiles them all.
GPU_CONFIGS = {
    128: ((128, 32, 8, 3), (128, 32, 8, 4), (128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 8, 3)),
    64: ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 4)),
    32: ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)),
}


def _config_key(c) -> tuple:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _gpu_configs():
    keys = sorted({k for table in GPU_CONFIGS.values() for k in table})
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in keys]


def _prune(configs, named_args, **kwargs):
    half = kwargs["HALF"] if "HALF" in kwargs else named_args["HALF"]
    wanted = GPU_CONFIGS[2 * half]
    return [c for c in configs if _config_key(c) in wanted]


@triton.jit
def _load_tile(ptr, rows, stride_l, mask, D: tl.constexpr, MASKED: tl.constexpr):
    cols = tl.arange(0, D)
    ptrs = ptr + rows[:, None] * stride_l + cols[None, :]
    if MASKED:
        return tl.load(ptrs, mask=mask[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    qe,
    qo,
    k_ptr,
    v_ptr,
    stride_kl,
    stride_vl,
    start_n,
    split,
    ks,
    cos_ptr,
    sin_ptr,
    L,
    qk_scale,
    eps,
    BLOCK_N: tl.constexpr,
    HALF: tl.constexpr,
    NORM: tl.constexpr,
    ROPE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One BLOCK_N tile of keys/values folded into the running (acc, m_i, l_i). MASKED: the ragged last tile."""
    rows = start_n + tl.arange(0, BLOCK_N)
    mask = rows < L
    if NORM or ROPE:
        ke, ko = load_halves(k_ptr, rows, stride_kl, mask, HALF, MASKED)
        dtype = ke.dtype
        cos, sin = load_angles(cos_ptr, sin_ptr, rows, mask, HALF)
        ke, ko = norm_rope_halves(ke, ko, rows, split, ks[0], ks[1], ks[2], ks[3], cos, sin, eps, HALF, NORM, ROPE)
        ke, ko = ke.to(dtype), ko.to(dtype)  # rounded to the input dtype, as the reference's rotated k is
        if DOT_FP32:
            s = tl.dot(qe, tl.trans(ke.to(tl.float32)), input_precision="ieee")
            s = tl.dot(qo, tl.trans(ko.to(tl.float32)), s, input_precision="ieee")
        else:
            s = tl.dot(qe, tl.trans(ke))
            s = tl.dot(qo, tl.trans(ko), s)
    else:
        k = _load_tile(k_ptr, rows, stride_kl, mask, 2 * HALF, MASKED)
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
    if MASKED:
        s = tl.where(mask[None, :], s, float("-inf"))
    # online softmax in base 2: p = 2^(s * scale * log2(e) - m)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_ptr, rows, stride_vl, mask, 2 * HALF, MASKED)
    p = p.to(v.dtype)  # the probabilities enter the second product in the input dtype, as in flash attention
    if DOT_FP32:
        acc = tl.dot(p.to(tl.float32), v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p, v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _rope_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,  # q, k, v (B, H, L, D) strided; out (B, L, H*D) contiguous
    qs0_ptr,
    qs1_ptr,
    ks0_ptr,
    ks1_ptr,  # (D,) norm scales before / from `split`
    cos_ptr,
    sin_ptr,  # (L, D/2) float32
    split,
    L,
    H,
    qk_scale,
    eps,  # qk_scale = log2(e) / sqrt(D)
    stride_qb,
    stride_qh,
    stride_ql,  # q strides in elements (batch, head, token); the D stride is 1
    stride_kb,
    stride_kh,
    stride_kl,  # k likewise
    stride_vb,
    stride_vh,
    stride_vl,  # v likewise
    HALF: tl.constexpr,
    NORM: tl.constexpr,
    ROPE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_ptr += b * stride_qb + h * stride_qh
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh

    # this program's queries: normalized, rotated and rounded once
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows_m < L
    q = tl.zeros((BLOCK_M, 2 * HALF), tl.float32)
    qe = tl.zeros((BLOCK_M, HALF), tl.float32)
    qo = tl.zeros((BLOCK_M, HALF), tl.float32)
    ks = (tl.zeros((HALF,), tl.float32),) * 4
    if NORM or ROPE:
        qe, qo = load_halves(q_ptr, rows_m, stride_ql, mask_m, HALF, True)
        dtype = qe.dtype
        qs = load_scale_halves(qs0_ptr, HALF) + load_scale_halves(qs1_ptr, HALF)
        ks = load_scale_halves(ks0_ptr, HALF) + load_scale_halves(ks1_ptr, HALF)
        cos, sin = load_angles(cos_ptr, sin_ptr, rows_m, mask_m, HALF)
        qe, qo = norm_rope_halves(qe, qo, rows_m, split, qs[0], qs[1], qs[2], qs[3], cos, sin, eps, HALF, NORM, ROPE)
        qe, qo = qe.to(dtype), qo.to(dtype)
        if DOT_FP32:
            qe, qo = qe.to(tl.float32), qo.to(tl.float32)
    else:
        q = _load_tile(q_ptr, rows_m, stride_ql, mask_m, 2 * HALF, True)
        if DOT_FP32:
            q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, 2 * HALF), tl.float32)
    full_tiles_end = (L // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_tiles_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc,
            m_i,
            l_i,
            q,
            qe,
            qo,
            k_ptr,
            v_ptr,
            stride_kl,
            stride_vl,
            start_n,
            split,
            ks,
            cos_ptr,
            sin_ptr,
            L,
            qk_scale,
            eps,
            BLOCK_N,
            HALF,
            NORM,
            ROPE,
            DOT_FP32,
            False,
        )
    if full_tiles_end < L:
        acc, m_i, l_i = _attend_tile(
            acc,
            m_i,
            l_i,
            q,
            qe,
            qo,
            k_ptr,
            v_ptr,
            stride_kl,
            stride_vl,
            full_tiles_end,
            split,
            ks,
            cos_ptr,
            sin_ptr,
            L,
            qk_scale,
            eps,
            BLOCK_N,
            HALF,
            NORM,
            ROPE,
            DOT_FP32,
            True,
        )

    out = acc / l_i[:, None]
    cols = tl.arange(0, 2 * HALF)
    row_stride = H * 2 * HALF
    out_ptrs = out_ptr + b * L * row_stride + rows_m[:, None].to(tl.int64) * row_stride + h * 2 * HALF + cols[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


_AUTOTUNER_LOCK = threading.Lock()  # serving threads share the kernel object; launches are asynchronous, so cheap
_rope_attention_tuned = triton.autotune(
    _gpu_configs(), key=["L", "HALF", "NORM", "ROPE"], prune_configs_by={"early_config_prune": _prune}
)(_rope_attention_kernel)


def _check(q, k, v, q_scales, k_scales, cos, sin, norm, rope):
    _launch.check_float("q", q)
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, L, D), got shape {tuple(q.shape)}")
    B, H, L, D = q.shape
    _launch.check_head_dim(D)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _launch.check_float(name, t, q.dtype)
        _launch.check_shape(name, t, (B, H, L, D))
        _launch.check_last_dim_contiguous(name, t)
    scales = ()
    if norm:
        scales = _launch.check_scales("q_scales", q_scales, D) + _launch.check_scales("k_scales", k_scales, D)
    if rope:
        _launch.check_rope_tables(cos, sin, L, D)
    return scales


def rope_attention(
    q,
    k,
    v,
    q_scales=None,
    k_scales=None,
    split: int = 0,
    cos=None,
    sin=None,
    *,
    norm: bool = True,
    rope: bool = True,
    out=None,
):
    """softmax(rope(norm(q)) rope(norm(k))^T / sqrt(D)) v as (B, L, H*D); `out` a buffer to write into."""
    scales = _check(q, k, v, q_scales, k_scales, cos, sin, norm, rope)
    B, H, L, D = q.shape
    kernel = _rope_attention_tuned if q.device.type == "cuda" else _rope_attention_kernel
    # unused pointer arguments get q: never read, their branches are compiled out
    qs0, qs1, ks0, ks1 = scales or (q,) * 4
    cos, sin = (cos, sin) if rope else (q, q)
    _launch.check_device(_rope_attention_kernel, q, k, v, cos, sin, qs0, qs1, ks0, ks1)
    if out is None:
        out = torch.empty(B, L, H * D, dtype=q.dtype, device=q.device)
    _launch.check_shape("out", out, (B, L, H * D))
    if not out.is_contiguous() or out.dtype != q.dtype:
        raise ValueError(f"out must be a contiguous {q.dtype} tensor")
    if L == 0 or B * H == 0:
        return out
    args = (
        q,
        k,
        v,
        out,
        qs0,
        qs1,
        ks0,
        ks1,
        cos,
        sin,
        split,
        L,
        H,
        LOG2E / math.sqrt(D),
        EPS,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
    )
    # fp32 inputs get true fp32 products (not TF32); the interpreter multiplies bf16 wrongly, so it upcasts too
    flags = dict(HALF=D // 2, NORM=norm, ROPE=rope, DOT_FP32=q.dtype == torch.float32 or q.device.type == "cpu")
    if kernel is _rope_attention_tuned:
        with _AUTOTUNER_LOCK:  # the autotuner keeps the current call's arguments on itself while it runs
            kernel[lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)](*args, **flags)
    else:
        block = BLOCK_INTERPRET
        kernel[(triton.cdiv(L, block), B * H)](*args, **flags, BLOCK_M=block, BLOCK_N=block, num_warps=4)
    return out


@torch.library.custom_op("kontext_rt::rope_attention", mutates_args=())
def rope_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_scale0: torch.Tensor,
    q_scale1: torch.Tensor,
    k_scale0: torch.Tensor,
    k_scale1: torch.Tensor,
    split: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm: bool,
    rope: bool,
) -> torch.Tensor:
    return rope_attention(q, k, v, (q_scale0, q_scale1), (k_scale0, k_scale1), split, cos, sin, norm=norm, rope=rope)


@rope_attention_op.register_fake
def _(q, k, v, q_scale0, q_scale1, k_scale0, k_scale1, split, cos, sin, norm, rope):
    B, H, L, D = q.shape
    return q.new_empty(B, L, H * D)
