"""A row-invariant linear: row r of x @ w.T + b is bit for bit the same however many rows x has.

    x    (R, K)  float32 / float16 / bfloat16, contiguous last dim
    w    (N, K)  same dtype, contiguous
    b    (N,)    same dtype, or None
    out  (R, N)  x's dtype

Why: the runtime hoists the modulation vectors of every step out of the sampling loop, one matmul over all
steps' rows per layer instead of one per step (docs/model.md; 3.2B parameters read once per image instead of
once per step). A BLAS or cuBLAS GEMM picks its algorithm (GEMV for one row, split-K for few) from the row count,
so the per-step and the hoisted results differ in the last bits. Here every output element is accumulated the
same way whatever R is: a fixed BLOCK_K walk over K in order, one fp32 accumulator per element, rows never
interacting (each tl.dot row depends on its own A row only). Tiles are fixed, never autotuned, for the same reason.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kontext_rt.kernels import _launch

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64
NUM_WARPS, NUM_STAGES = 4, 3  # fixed like the tiles (the ahead-of-time compile test builds exactly this)


@triton.jit
def _row_linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,  # x (R, K), w (N, K), b (N,), out (R, N)
    R,
    N,
    K,
    stride_xr,
    stride_wn,
    stride_or,  # row strides in elements; the K / N stride is 1
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < R, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_xr + ks[None, :],
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None],
            mask=cmask[None, :] & kmask[:, None],
            other=0.0,
        )  # (BLOCK_K, BLOCK_N): w transposed
        if INTERPRET:
            # numpy's tile matmul (BLAS) rounds a row differently by its position in the tile (remainder-row
            # micro-kernels); a broadcast product summed over K in order does not, and bf16 is upcast (the
            # interpreter's bf16 tl.dot multiplies bit patterns as integers)
            acc += tl.sum(a.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        elif IEEE:  # float32 models: full precision, as torch's own float32 matmul (no TF32)
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:  # tensor cores: each output element's MMA accumulation depends on its own row only
            acc = tl.dot(a, w, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * stride_or + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def row_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b for x (R, K), row-invariant (see the module docstring)."""
    _launch.check_float("x", x)
    _launch.check_float("w", w, x.dtype)
    _launch.check_shape("x", x, (None, None))
    R, K = x.shape
    _launch.check_shape("w", w, (None, K))
    N = w.shape[0]
    if b is not None:
        _launch.check_float("b", b, x.dtype)
        _launch.check_shape("b", b, (N,))
        if not b.is_contiguous():
            raise ValueError("b must be contiguous")
    _launch.check_last_dim_contiguous("x", x)
    if not w.is_contiguous():
        raise ValueError("w must be contiguous (N, K)")
    _launch.check_device(_row_linear_kernel, x, w, *([] if b is None else [b]))
    out = torch.empty(R, N, dtype=x.dtype, device=x.device)
    if R == 0 or N == 0:
        return out
    interpret = _launch.interpreted(_row_linear_kernel)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(R, BLOCK_M))
    _row_linear_kernel[grid](
        x,
        w,
        b if b is not None else w,
        out,
        R,
        N,
        K,
        x.stride(0),
        w.stride(0),
        out.stride(0),
        HAS_BIAS=b is not None,
        INTERPRET=interpret,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return out


@torch.library.custom_op("kontext_rt::row_linear", mutates_args=())
def row_linear_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return row_linear(x, w, b)


@row_linear_op.register_fake
def _(x, w, b):
    return x.new_empty(x.shape[0], w.shape[0])
