"""GELU (tanh) + concatenation + dynamic per-token FP8 (e4m3) quantization in one pass: the input of a FLUX single
block's linear2, and of a double block MLP's second linear (no attn part).

    attn   (R, A)      float32 / float16 / bfloat16, contiguous last dim; A may be 0 (attn None)
    mlp_in (R, M)      same dtype, contiguous last dim
    q      (R, A + M)  float8_e4m3fn, contiguous:  the e4m3 rows of cat(attn, gelu_tanh(mlp_in))
    scale  (R, 1)      float32: one scale per row, as kernels/fp8_quant.py

The result is reference.gelu_quantize_rows: quantize_rows(torch.cat((attn, F.gelu(mlp_in, approximate="tanh")),
-1)). GELU is evaluated in float32 (compiled, with torch's formula and operation order: 0.5 x (1 + tanh(k (x +
0.044715 x^3)))) and rounded to the input dtype, as F.gelu's output is, before it enters the amax and the quantization.
Unfused, torch writes the GELU output, copies it and attn into the cat, and the quantizer reads the cat back; here
attn and mlp_in are read and only the e4m3 bytes and the scales are written.

The scale needs the row's amax before any byte is written, so one program quantizes one row in two passes, as
fp8_quant does: the first loops over the row in BLOCK-wide tiles for the amax (GELU computed on the way), the
second reads the row again, recomputes GELU and writes. A FLUX row is 3072 + 12288 values (30 KB in bf16): the
second read is served from L2, so DRAM sees one read and one write, and GELU is recomputed rather than written
anywhere (two tanh per element: whether that keeps the kernel at the memory's rate is for the GPU run to
show). Holding a whole row in registers instead would need a 16384-wide tile (64 values a thread at 8 warps plus
GELU's temporaries) for one width only; the loop works for any width.

tanh: compiled, libdevice's tanhf, what CUDA's tanhf and so torch's GELU kernel on the GPU call (equal bits there
are likely but not yet measured: the multiply-adds may contract differently). The interpreter has no libdevice:
there GELU is x / (1 + exp(-2u)) in float32, the same function without tanh's cancellation near -1. Against the
tanh torch used on the CPU (or GPU) either differs by an ulp or so of float32, which can move GELU's rounded
value by one ulp of the input dtype; tests/test_gelu_quant.py derives the bound this gives. Everything after GELU
is fp8_quant's arithmetic: IEEE divisions (`tl.div_rn`), explicit e4m3 rounding, and bfloat16 rounding done
explicitly (round to nearest even) because the interpreter's float32 -> bfloat16 cast truncates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kontext_rt.kernels import _launch, fp8_quant
from kontext_rt.kernels.fp8_quant import _round_e4m3

E4M3_MAX = tl.constexpr(448.0)
GELU_BETA = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi): torch's kBeta = M_SQRT2 * M_2_SQRTPI * 0.5
GELU_KAPPA = tl.constexpr(0.044715)


@triton.jit
def _round_bf16(v):
    """float32 v rounded to the nearest bfloat16 (ties to even), as a float32: the cast's rounding, done by hand
    because the interpreter's cast truncates. Infinities stay infinite; NaN is passed through (a negative NaN's
    carry would wrap to zero)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000 as int32
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def _gelu_tanh(x, OUT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 x -> GELU (tanh approximation) rounded to OUT_DTYPE, returned as float32."""
    inner = GELU_BETA * (x + GELU_KAPPA * (x * x * x))
    if INTERPRET:
        # 0.5 x (1 + tanh u) = x / (1 + exp(-2u)), without tanh's cancellation near -1; |u| <= 20 keeps exp
        # finite and moves no value by more than x * 1e-17
        g = tl.div_rn(x, 1.0 + tl.exp(-2.0 * tl.minimum(tl.maximum(inner, -20.0), 20.0)))
    else:
        g = 0.5 * x * (1.0 + libdevice.tanh(inner))
    if OUT_DTYPE == tl.bfloat16:
        g = _round_bf16(g)
    else:
        g = g.to(OUT_DTYPE).to(tl.float32)  # float16 rounds correctly in both modes; float32 is a no-op
    return g


@triton.jit
def _gelu_quant_kernel(
    attn_ptr,  # (R, A) strided rows (any valid pointer when A == 0)
    mlp_ptr,  # (R, M) strided rows
    q_ptr,  # (R, A + M) contiguous
    scale_ptr,  # (R,)
    A,
    M,
    stride_ar,  # attn's row stride, elements
    stride_mr,  # mlp_in's row stride, elements
    amax_floor,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    a_row = attn_ptr + row * stride_ar
    m_row = mlp_ptr + row * stride_mr
    q_row = q_ptr + row * (A + M)
    dtype = mlp_ptr.dtype.element_ty
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, A, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(a_row + ks, mask=ks < A, other=0.0).to(tl.float32)))
    for k0 in range(0, M, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        g = _gelu_tanh(tl.load(m_row + ks, mask=ks < M, other=0.0).to(tl.float32), dtype, INTERPRET)
        amax = tl.maximum(amax, tl.abs(g))
    scale = tl.div_rn(tl.maximum(tl.max(amax, 0), amax_floor), E4M3_MAX)
    for k0 in range(0, A, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        x = tl.load(a_row + ks, mask=ks < A, other=0.0).to(tl.float32)
        q = _round_e4m3(tl.minimum(tl.maximum(tl.div_rn(x, scale), -E4M3_MAX), E4M3_MAX))
        tl.store(q_row + ks, q.to(tl.float8e4nv), mask=ks < A)
    for k0 in range(0, M, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        g = _gelu_tanh(tl.load(m_row + ks, mask=ks < M, other=0.0).to(tl.float32), dtype, INTERPRET)
        q = _round_e4m3(tl.minimum(tl.maximum(tl.div_rn(g, scale), -E4M3_MAX), E4M3_MAX))
        tl.store(q_row + A + ks, q.to(tl.float8e4nv), mask=ks < M)
    tl.store(scale_ptr + row, scale)


def launch_config(A: int, M: int) -> tuple[int, int]:
    """(BLOCK, num_warps): fp8_quant's rule for the wider of the two parts (4096 and 8 warps at FLUX's widths;
    the ahead-of-time compile test builds exactly this)."""
    return fp8_quant.launch_config(max(A, M))


def gelu_quantize_rows(
    attn: torch.Tensor | None,
    mlp_in: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (R, A + M) float8_e4m3fn, scale (R, 1) float32): quantize_rows of cat(attn, gelu_tanh(mlp_in)).

    attn None means A = 0. out: optional preallocated (q, scale) to write into (the tests poison them)."""
    _launch.check_float("mlp_in", mlp_in)
    _launch.check_shape("mlp_in", mlp_in, (None, None))
    _launch.check_last_dim_contiguous("mlp_in", mlp_in)
    R, M = mlp_in.shape
    if M == 0:
        raise ValueError(f"mlp_in has shape {tuple(mlp_in.shape)}: its width must be at least 1")
    if attn is None:
        attn, A = mlp_in, 0
    else:
        _launch.check_float("attn", attn, mlp_in.dtype)
        _launch.check_shape("attn", attn, (R, None))
        _launch.check_last_dim_contiguous("attn", attn)
        A = attn.shape[1]
    _launch.check_device(_gelu_quant_kernel, attn, mlp_in)
    if out is None:
        q = torch.empty(R, A + M, dtype=torch.float8_e4m3fn, device=mlp_in.device)
        scale = torch.empty(R, 1, dtype=torch.float32, device=mlp_in.device)
    else:
        q, scale = out
        _check_out(q, scale, R, A + M, mlp_in.device)
    if R == 0:
        return q, scale
    block, warps = launch_config(A, M)
    interpret = _launch.interpreted(_gelu_quant_kernel)
    _gelu_quant_kernel[(R,)](
        attn,
        mlp_in,
        q,
        scale,
        A,
        M,
        attn.stride(0),
        mlp_in.stride(0),
        fp8_quant.AMAX_FLOOR,
        BLOCK=block,
        INTERPRET=interpret,
        num_warps=warps,
    )
    return q, scale


def _check_out(q: torch.Tensor, scale: torch.Tensor, rows: int, width: int, device: torch.device) -> None:
    if q.dtype != torch.float8_e4m3fn or q.shape != (rows, width) or not q.is_contiguous():
        raise ValueError(f"out q must be a contiguous ({rows}, {width}) float8_e4m3fn tensor, got {q.dtype} {q.shape}")
    if scale.dtype != torch.float32 or scale.shape != (rows, 1) or not scale.is_contiguous():
        raise ValueError(f"out scale must be a contiguous ({rows}, 1) float32 tensor, got {scale.dtype} {scale.shape}")
    if q.device != device or scale.device != device:
        raise ValueError(f"out tensors must be on {device}")


def error_bound(attn: torch.Tensor | None, mlp_in: torch.Tensor, scale: torch.Tensor, ref_scale: torch.Tensor):
    """(R, A + M) float64: how far each dequantized value q * scale of this kernel may be from the reference's
    (reference.gelu_quantize_rows, scales ref_scale), derived from the one difference between them, GELU's tanh.

    Each float32 GELU is 0.5 x (1 + t) with t within about a float32 ulp of 1 of tanh (2 eps32 |x| counts both
    GELUs' errors), then rounded once to the input dtype, which may put the two on neighbouring values:
    |g_k - g_r| <= delta = ulp_dtype(g_r) + 2 eps32 |x| (attn is copied: delta 0). Each q * s is within half an
    e4m3 step (times its scale) of its own value, so |q_k s_k - q_r s_r| <= delta + max(s) * step(max(|x_k|,
    |x_r|) / min(s)), step(u) = 2**(max(floor(log2 u), -6) - 3) (3 mantissa bits, subnormal below 2**-6), with
    |x_k| <= |x_r| + delta. Used by tests/test_gelu_quant.py and the GPU benchmark."""
    import torch.nn.functional as F

    g = F.gelu(mlp_in, approximate="tanh").double()
    tiny = torch.finfo(mlp_in.dtype).tiny
    ulp = torch.finfo(mlp_in.dtype).eps * torch.exp2(torch.floor(torch.log2(g.abs().clamp(min=tiny))))
    delta_g = ulp + 2 * torch.finfo(torch.float32).eps * mlp_in.double().abs()
    if attn is None:
        delta, mag = delta_g, g.abs() + delta_g
    else:
        delta = torch.cat((torch.zeros_like(attn, dtype=torch.float64), delta_g), -1)
        mag = torch.cat((attn.double().abs(), g.abs() + delta_g), -1)
    s_k, s_r = scale.double(), ref_scale.double()
    smax, smin = torch.maximum(s_k, s_r), torch.minimum(s_k, s_r)
    step = torch.exp2(torch.floor(torch.log2((mag / smin).clamp(min=2.0**-6))) - 3)
    return delta + smax * step


@torch.library.custom_op("kontext_rt::gelu_quantize_rows", mutates_args=())
def gelu_quantize_rows_op(attn: torch.Tensor | None, mlp_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return gelu_quantize_rows(attn, mlp_in)


@gelu_quantize_rows_op.register_fake
def _(attn, mlp_in):
    width = mlp_in.shape[1] + (0 if attn is None else attn.shape[1])
    return (
        mlp_in.new_empty(mlp_in.shape[0], width, dtype=torch.float8_e4m3fn),
        mlp_in.new_empty(mlp_in.shape[0], 1, dtype=torch.float32),
    )
