"""Dynamic per-token FP8 (e4m3) quantization of activations, one pass per row.

    x      (R, K)  float32 / float16 / bfloat16, contiguous last dim
    q      (R, K)  float8_e4m3fn, contiguous:  q = round_to_e4m3(clamp(x / scale, -448, 448))
    scale  (R, 1)  float32:                    scale = max(amax(|x| of the row), AMAX_FLOOR) / 448

so that x ~= q * scale row by row: the `scale_a` of torch._scaled_mm's row-wise scaling. Torch needs five passes
(abs, amax, divide, clamp, cast); here each row is read twice from L2 (amax, then quantize) and written once.
Rounding to the e4m3 grid is done explicitly in float32 (round half to even, subnormals included), so the result
is torch's own cast bit for bit on every device, the Triton interpreter included (whose float->fp8 cast truncates).
Both divisions are IEEE round-to-nearest (`tl.div_rn`), as the reference's are: Triton lowers a plain float32 `/`
to an approximate `div.full.f32` on NVIDIA GPUs, which would move some quotients by an ulp and so change the scale
or the rounded value (tests/test_kernel_compile.py reads the PTX to hold this).
The reference is kontext_rt.model.fp8_linear.quantize_rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kontext_rt.kernels import _launch

E4M3_MAX = tl.constexpr(448.0)  # constexpr: compiled Triton refuses plain module globals inside a kernel
AMAX_FLOOR = 1e-12  # an all-zero row gets a tiny scale, never a division by zero
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + M) - M rounds v to an integer, half to even, |v| < 2**22


@triton.jit
def _round_e4m3(v):
    """v (float32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, as a float32."""
    bits = v.to(tl.int32, bitcast=True)
    exp = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # e4m3: 3 mantissa bits, subnormal below 2**-6
    step = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2**(exp-3), exact
    inv_step = ((127 - (exp - 3)) << 23).to(tl.float32, bitcast=True)  # 2**(3-exp): v * inv_step == v / step
    r = ((v * inv_step + ROUND_MAGIC) - ROUND_MAGIC) * step  # powers of two, in range: every product exact
    return tl.where(r == 0.0, v * 0.0, r)  # keep the sign of values that round to zero, as torch's cast does


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,  # x (R, K) strided rows; q (R, K) contiguous; scale (R,)
    K,
    stride_xr,
    amax_floor,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.div_rn(tl.maximum(tl.max(amax, 0), amax_floor), E4M3_MAX)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)
        q = _round_e4m3(tl.minimum(tl.maximum(tl.div_rn(x, scale), -E4M3_MAX), E4M3_MAX))
        tl.store(q_ptr + row * K + ks, q.to(tl.float8e4nv), mask=ks < K)
    tl.store(scale_ptr + row, scale)


def launch_config(K: int) -> tuple[int, int]:
    """(BLOCK_K, num_warps) for rows of K elements: one tile up to 4096 wide, 256 elements per warp (the
    ahead-of-time compile test builds exactly this)."""
    block = min(4096, triton.next_power_of_2(max(K, 16)))
    return block, max(1, min(8, block // 256))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (R, K) float8_e4m3fn, scale (R, 1) float32) with x ~= q * scale per row."""
    _launch.check_float("x", x)
    _launch.check_shape("x", x, (None, None))
    _launch.check_last_dim_contiguous("x", x)
    _launch.check_device(_quantize_rows_kernel, x)
    R, K = x.shape
    q = torch.empty(R, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(R, 1, dtype=torch.float32, device=x.device)
    if R == 0:
        return q, scale
    block, warps = launch_config(K)
    _quantize_rows_kernel[(R,)](x, q, scale, K, x.stride(0), AMAX_FLOOR, BLOCK_K=block, num_warps=warps)
    return q, scale


@torch.library.custom_op("kontext_rt::quantize_rows", mutates_args=())
def quantize_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(x)


@quantize_rows_op.register_fake
def _(x):
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[0], 1, dtype=torch.float32))
