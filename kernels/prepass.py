"""The attention pre-pass: QK RMSNorm + RoPE, optional smoothing of k, the transpose to FA3's layout and optional
per-(batch, head) e4m3 quantization, in Triton. The spec is reference.attention_prepass.

    q, k, v        (B, H, L, D)  float32 / float16 / bfloat16, any strides with a contiguous last dim
    q/k scales     pairs of (D,) learned scales: [0] for tokens < split (text of a double block), [1] after
    cos, sin       (L, D/2) float32
    returns        (q, k, v) (B, L, H, D) contiguous, the input dtype or float8_e4m3fn with fp8; with fp8 the
                   descales (B, H) float32 (x ~= value * descale), else None

Passes (each a grid of BLOCK-row tiles x (batch, head); a row of D elements is read and written whole, so the
accesses vectorize to 16 bytes, and the interleaved pairs are split in registers as in qk_norm_rope.py):
  - plain (no fp8, no smooth_k): one pass, `_write_kernel`: one read and one write of q, k and v.
  - fp8 or smooth_k: a per-(batch, head) statistic over every token is needed before any value can be written.
    `_stats_kernel` reads q, k, v once, re-does norm+RoPE and writes per-tile partials: amax of each tensor and,
    with smooth_k, k's column sums, maxima and minima (the amax of k - mean is max_d max(colmax - m, m - colmin),
    as subtraction and rounding are monotonic, so smoothing and fp8 together need no third pass). `_finalize_kernel`
    (one program per (batch, head)) reduces the partials in a fixed order into k's mean and the descales; then
    `_write_kernel` reads q, k, v again, re-does norm+RoPE, subtracts the mean, divides by the descale and writes.
    Traffic: two reads and one write per tensor, at bf16 with fp8 2 + 2 + 1 = 5 bytes per element (against 7 for a
    bf16 write and a separate quantize pass), plus the partials, written once and read once: one float per tile and
    tensor, and with smooth_k three float32 D-vectors per tile of k (1.5 KiB per 8 KiB bf16 tile at BLOCK 32, ~5%
    of the fp8 mode's traffic; a larger statistics tile would shrink it). smooth_k without fp8 reads only k twice.
    No atomics: the result is the same bits on every run.

Numerics follow the reference's roundings: the normalized, rotated row is computed in float32 and rounded once to
the input dtype (the reference rounds after the norm, after the scale and after the rotation: the kernel tests
bound the difference); smoothing subtracts the float32 mean of those rounded values and rounds again; fp8 divides
the rounded values by the descale (IEEE `div_rn`, as torch's `/`) and rounds to e4m3 explicitly
(fp8_quant._round_e4m3), so the e4m3 output is quantize_per_head of the non-fp8 output bit for bit (on a GPU as
long as both kernels compile `_rows` alike, which the CPU cannot check).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kontext_rt.kernels import _launch
from kontext_rt.kernels._rope_tile import load_angles
from kontext_rt.kernels.fp8_quant import E4M3_MAX, _round_e4m3
from kontext_rt.kernels.reference import EPS

BLOCK_L_GPU = 32  # rows per program, as qk_norm_rope: (32, 128) tiles, memory bound
BLOCK_L_INTERPRET = 128  # the interpreter pays per program, not per element
BLOCK_PARTIALS = 16  # partials (tiles) reduced per step of the finalize loop


@triton.jit
def _rows(
    x_ptr,
    stride_l,
    rows,
    mask,
    split,
    s0_ptr,
    s1_ptr,
    cos,
    sin,
    eps,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
    NORM: tl.constexpr,
):
    """(BLOCK, D) rows of x, with NORM RMS-normalized (scale s0 for rows < split, s1 after) and rotated, rounded
    once to x's dtype and returned in float32 (masked rows are 0)."""
    cols = tl.arange(0, 2 * HALF)
    x = tl.load(x_ptr + rows[:, None] * stride_l + cols[None, :], mask=mask[:, None], other=0.0)
    dtype = x.dtype
    x = x.to(tl.float32)
    if NORM:
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / (2 * HALF) + eps)[:, None]
        s0 = tl.load(s0_ptr + cols).to(tl.float32)
        s1 = tl.load(s1_ptr + cols).to(tl.float32)
        x = x * rstd * tl.where((rows < split)[:, None], s0[None, :], s1[None, :])
        e, o = tl.split(tl.reshape(x, (BLOCK, HALF, 2)))
        x = tl.reshape(tl.join(e * cos - o * sin, e * sin + o * cos), (BLOCK, 2 * HALF))
        x = x.to(dtype).to(tl.float32)
    return x


@triton.jit
def _stats_kernel(
    q_ptr,
    k_ptr,
    v_ptr,  # inputs (B, H, L, D) strided
    qs0_ptr,
    qs1_ptr,
    ks0_ptr,
    ks1_ptr,  # (D,) scales before / from `split`
    cos_ptr,
    sin_ptr,  # (L, D/2) float32
    amax_ptr,  # (3, B*H, NT) float32: amax of q, k, v per tile (k's unused with SMOOTH)
    col_ptr,  # (3, B*H, NT, D) float32: k's column sum, max and min per tile (SMOOTH only)
    split,
    L,
    H,
    NT,  # tiles per (batch, head): cdiv(L, BLOCK)
    stride_qb,
    stride_qh,
    stride_ql,  # q strides in elements (batch, head, token); the D stride is 1
    stride_kb,
    stride_kh,
    stride_kl,  # k likewise
    stride_vb,
    stride_vh,
    stride_vl,  # v likewise
    eps,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
    FP8: tl.constexpr,
    SMOOTH: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_l * BLOCK + tl.arange(0, BLOCK)
    mask = rows < L
    cos, sin = load_angles(cos_ptr, sin_ptr, rows, mask, HALF)
    tile = pid_bh.to(tl.int64) * NT + pid_l
    BH = tl.num_programs(1).to(tl.int64)
    k = _rows(
        k_ptr + b * stride_kb + h * stride_kh,
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
        True,
    )
    if SMOOTH:
        cols = tl.arange(0, 2 * HALF)
        col = col_ptr + tile * (2 * HALF) + cols
        tl.store(col, tl.sum(k, axis=0))
        tl.store(col + BH * NT * (2 * HALF), tl.max(tl.where(mask[:, None], k, float("-inf")), axis=0))
        tl.store(col + 2 * BH * NT * (2 * HALF), tl.min(tl.where(mask[:, None], k, float("inf")), axis=0))
    if FP8:
        q = _rows(
            q_ptr + b * stride_qb + h * stride_qh,
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
            True,
        )
        v = _rows(
            v_ptr + b * stride_vb + h * stride_vh,
            stride_vl,
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
            False,
        )
        tl.store(amax_ptr + tile, tl.max(tl.max(tl.abs(q), axis=1), axis=0))
        tl.store(amax_ptr + BH * NT + tile, tl.max(tl.max(tl.abs(k), axis=1), axis=0))
        tl.store(amax_ptr + 2 * BH * NT + tile, tl.max(tl.max(tl.abs(v), axis=1), axis=0))


@triton.jit
def _descale(amax):
    """amax / 448 rounded as torch divides; 1 for an all-zero head (reference.quantize_per_head)."""
    return tl.where(amax > 0, tl.div_rn(amax, E4M3_MAX), 1.0)


@triton.jit
def _reduce_amax(ptr, NT, BLOCK_T: tl.constexpr):
    """The max of NT partial amaxes at ptr."""
    ts = tl.arange(0, BLOCK_T)
    amax = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for t0 in range(0, NT, BLOCK_T):
        amax = tl.maximum(amax, tl.load(ptr + t0 + ts, mask=t0 + ts < NT, other=0.0))
    return tl.max(amax, axis=0)


@triton.jit
def _finalize_kernel(
    amax_ptr,  # (3, B*H, NT) float32 from _stats_kernel
    col_ptr,  # (3, B*H, NT, D) float32 from _stats_kernel
    qd_ptr,
    kd_ptr,
    vd_ptr,  # (B*H,) float32 out: the descales of q, k, v (FP8)
    mean_ptr,  # (B*H, D) float32 out: k's mean over tokens (SMOOTH)
    NT,
    L,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    FP8: tl.constexpr,
    SMOOTH: tl.constexpr,
    K_DTYPE: tl.constexpr,  # k's dtype: the smoothed values are rounded to it before their amax
):
    """One program per (batch, head): the tiles' partials reduced in a fixed order (the same bits every run)."""
    bh = tl.program_id(0).to(tl.int64)
    BH = tl.num_programs(0).to(tl.int64)
    ts = tl.arange(0, BLOCK_T)
    cols = tl.arange(0, 2 * HALF)
    if SMOOTH:
        total = tl.zeros((2 * HALF,), dtype=tl.float32)
        cmax = tl.full((2 * HALF,), float("-inf"), dtype=tl.float32)
        cmin = tl.full((2 * HALF,), float("inf"), dtype=tl.float32)
        for t0 in range(0, NT, BLOCK_T):
            m = (t0 + ts < NT)[:, None]
            offs = (bh * NT + t0 + ts)[:, None] * (2 * HALF) + cols[None, :]
            total += tl.sum(tl.load(col_ptr + offs, mask=m, other=0.0), axis=0)
            cmax = tl.maximum(
                cmax, tl.max(tl.load(col_ptr + BH * NT * (2 * HALF) + offs, mask=m, other=float("-inf")), axis=0)
            )
            cmin = tl.minimum(
                cmin, tl.min(tl.load(col_ptr + 2 * BH * NT * (2 * HALF) + offs, mask=m, other=float("inf")), axis=0)
            )
        mean = tl.div_rn(total, L.to(tl.float32))
        tl.store(mean_ptr + bh * (2 * HALF) + cols, mean)
        if FP8:
            # the extreme smoothed values of each column, rounded as _write_kernel rounds them (monotonic)
            hi = (cmax - mean).to(K_DTYPE).to(tl.float32)
            lo = (mean - cmin).to(K_DTYPE).to(tl.float32)
            tl.store(kd_ptr + bh, _descale(tl.max(tl.maximum(hi, lo), axis=0)))
    if FP8:
        tl.store(qd_ptr + bh, _descale(_reduce_amax(amax_ptr + bh * NT, NT, BLOCK_T)))
        if not SMOOTH:
            tl.store(kd_ptr + bh, _descale(_reduce_amax(amax_ptr + (BH + bh) * NT, NT, BLOCK_T)))
        tl.store(vd_ptr + bh, _descale(_reduce_amax(amax_ptr + (2 * BH + bh) * NT, NT, BLOCK_T)))


@triton.jit
def _store(out_ptr, rows, mask, y, descale, HALF: tl.constexpr, H, FP8: tl.constexpr):
    """Rows of one (batch, head) into (B, L, H, D): out_ptr points at [b, 0, h, 0], a token is H*D apart."""
    cols = tl.arange(0, 2 * HALF)
    ptrs = out_ptr + rows[:, None].to(tl.int64) * H * (2 * HALF) + cols[None, :]
    if FP8:
        y = _round_e4m3(tl.minimum(tl.maximum(tl.div_rn(y, descale), -E4M3_MAX), E4M3_MAX))
    tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _write_kernel(
    q_ptr,
    k_ptr,
    v_ptr,  # inputs (B, H, L, D) strided
    q_out_ptr,
    k_out_ptr,
    v_out_ptr,  # outputs (B, L, H, D) contiguous: the input dtype, or float8_e4m3fn with FP8
    qs0_ptr,
    qs1_ptr,
    ks0_ptr,
    ks1_ptr,  # (D,) scales before / from `split`
    cos_ptr,
    sin_ptr,  # (L, D/2) float32
    qd_ptr,
    kd_ptr,
    vd_ptr,  # (B*H,) float32 from _finalize_kernel (FP8)
    mean_ptr,  # (B*H, D) float32 from _finalize_kernel (SMOOTH)
    split,
    L,
    H,
    stride_qb,
    stride_qh,
    stride_ql,  # q strides in elements (batch, head, token); the D stride is 1
    stride_kb,
    stride_kh,
    stride_kl,  # k likewise
    stride_vb,
    stride_vh,
    stride_vl,  # v likewise
    eps,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
    FP8: tl.constexpr,
    SMOOTH: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_l * BLOCK + tl.arange(0, BLOCK)
    mask = rows < L
    cos, sin = load_angles(cos_ptr, sin_ptr, rows, mask, HALF)
    out_offset = b * L * H * (2 * HALF) + h * (2 * HALF)
    qd = 1.0
    kd = 1.0
    vd = 1.0
    if FP8:
        qd = tl.load(qd_ptr + pid_bh)
        kd = tl.load(kd_ptr + pid_bh)
        vd = tl.load(vd_ptr + pid_bh)
    q = _rows(
        q_ptr + b * stride_qb + h * stride_qh,
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
        True,
    )
    _store(q_out_ptr + out_offset, rows, mask, q, qd, HALF, H, FP8)
    k = _rows(
        k_ptr + b * stride_kb + h * stride_kh,
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
        True,
    )
    if SMOOTH:
        mean = tl.load(mean_ptr + pid_bh.to(tl.int64) * (2 * HALF) + tl.arange(0, 2 * HALF))
        k = (k - mean[None, :]).to(k_ptr.dtype.element_ty).to(tl.float32)
    _store(k_out_ptr + out_offset, rows, mask, k, kd, HALF, H, FP8)
    v = _rows(
        v_ptr + b * stride_vb + h * stride_vh,
        stride_vl,
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
        False,
    )
    _store(v_out_ptr + out_offset, rows, mask, v, vd, HALF, H, FP8)


TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _check(q, k, v, q_scales, k_scales, cos, sin):
    _launch.check_float("q", q)
    _launch.check_float("k", k, q.dtype)
    _launch.check_float("v", v, q.dtype)
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, L, D), got shape {tuple(q.shape)}")
    B, H, L, D = q.shape
    _launch.check_head_dim(D)
    for name, t in (("k", k), ("v", v)):
        _launch.check_shape(name, t, (B, H, L, D))
    for name, t in (("q", q), ("k", k), ("v", v)):
        _launch.check_last_dim_contiguous(name, t)
    _launch.check_rope_tables(cos, sin, L, D)
    return _launch.check_scales("q_scales", q_scales, D) + _launch.check_scales("k_scales", k_scales, D)


def attention_prepass(q, k, v, q_scales, k_scales, split: int, cos, sin, fp8: bool = False, smooth_k: bool = False):
    """(q, k, v, q_descale, k_descale, v_descale) as reference.attention_prepass returns them: (B, L, H, D)
    contiguous in the input dtype (float8_e4m3fn with fp8), descales (B, H) float32 with fp8, else None."""
    qs0, qs1, ks0, ks1 = _check(q, k, v, q_scales, k_scales, cos, sin)
    device = _launch.check_device(_write_kernel, q, k, v, cos, sin, qs0, qs1, ks0, ks1)
    if fp8 and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise RuntimeError(
            f"fp8 needs e4m3 support (compute capability 8.9 or newer, e.g. sm_90), got sm_{major}{minor}"
        )
    B, H, L, D = q.shape
    out_dtype = torch.float8_e4m3fn if fp8 else q.dtype
    outs = [torch.empty(B, L, H, D, dtype=out_dtype, device=device) for _ in range(3)]
    unused = torch.empty(1, dtype=torch.float32, device=device)  # the pointer for a buffer a mode does not use
    new = torch.ones if L == 0 else torch.empty  # the descale of a head without tokens is 1
    descales = [new(B, H, dtype=torch.float32, device=device) for _ in range(3)] if fp8 else [unused] * 3
    if L == 0 or B * H == 0:
        return (*outs, *(descales if fp8 else (None,) * 3))
    block = BLOCK_L_INTERPRET if device.type == "cpu" else BLOCK_L_GPU
    tiles = triton.cdiv(L, block)
    grid = (tiles, B * H)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    mean = torch.empty(B * H, D, dtype=torch.float32, device=device) if smooth_k else unused
    if fp8 or smooth_k:
        amax = torch.empty(3, B * H, tiles, dtype=torch.float32, device=device) if fp8 else unused
        cols = torch.empty(3, B * H, tiles, D, dtype=torch.float32, device=device) if smooth_k else unused
        flags = dict(HALF=D // 2, FP8=fp8, SMOOTH=smooth_k)
        _stats_kernel[grid](
            q,
            k,
            v,
            qs0,
            qs1,
            ks0,
            ks1,
            cos,
            sin,
            amax,
            cols,
            split,
            L,
            H,
            tiles,
            *strides,
            EPS,
            BLOCK=block,
            num_warps=4,
            **flags,
        )
        _finalize_kernel[(B * H,)](
            amax,
            cols,
            *descales,
            mean,
            tiles,
            L,
            BLOCK_T=BLOCK_PARTIALS,
            K_DTYPE=TL_DTYPES[k.dtype],
            num_warps=4,
            **flags,
        )
    _write_kernel[grid](
        q, k, v, *outs, qs0, qs1, ks0, ks1, cos, sin, *descales, mean, split, L, H, *strides, EPS,
        HALF=D // 2, BLOCK=block, FP8=fp8, SMOOTH=smooth_k, num_warps=4,
    )  # fmt: skip
    return (*outs, *(descales if fp8 else (None,) * 3))


# One op for torch.compile, torch.export and CUDA-graph capture (registered once, when this module is imported).
# Its descales are always tensors: (B, H) with fp8, empty (0,) without (a schema cannot return None).
@torch.library.custom_op("kontext_rt::attention_prepass", mutates_args=())
def attention_prepass_op(
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
    fp8: bool,
    smooth_k: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out = attention_prepass(q, k, v, (q_scale0, q_scale1), (k_scale0, k_scale1), split, cos, sin, fp8, smooth_k)
    none = q.new_empty(0, dtype=torch.float32)
    return tuple(t if t is not None else none.clone() for t in out)


@attention_prepass_op.register_fake
def _(q, k, v, q_scale0, q_scale1, k_scale0, k_scale1, split, cos, sin, fp8, smooth_k):
    B, H, L, D = q.shape
    dtype = torch.float8_e4m3fn if fp8 else q.dtype
    outs = tuple(q.new_empty(B, L, H, D, dtype=dtype) for _ in range(3))
    return (*outs, *(q.new_empty((B, H) if fp8 else (0,), dtype=torch.float32) for _ in range(3)))
