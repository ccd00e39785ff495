"""The fused GELU + cat + FP8 quantizer (kernels/gelu_quant.py) under the Triton interpreter.

Two checks, because the kernel's tanh is not torch's (see the kernel's docstring):

1. Bit for bit: given the kernel's own GELU values (`kernel_gelu`, the interpreter's float32 formula replayed in
   numpy, operation for operation), the e4m3 bytes and the scales equal fp8_linear.quantize_rows of the cat. This
   holds the amax, the scale, the e4m3 rounding, the bf16 rounding, the cat's column layout, ragged tails and
   strides exactly.
2. Against the reference composite (reference.gelu_quantize_rows: torch's F.gelu, torch.cat, quantize_rows), a
   bound derived element by element. Each float32 GELU, torch's and the kernel's, is 0.5 x (1 + t) with t within
   about one float32 ulp of 1 of tanh (error <= 2 eps32 at x's scale counts both), and each is then rounded once
   to the input dtype, which may land the two on neighbouring values: |g_k - g_r| <= delta = ulp_dtype(g) +
   2 eps32 |x|. Each dequantized value q * s is within half an e4m3 step (times its scale) of its own g, so
   |q_k s_k - q_r s_r| <= delta + max(s) * step(max(|g_k|, |g_r|) / min(s)), with step(u) = 2**(max(floor(log2
   u), -6) - 3) (3 mantissa bits, subnormal below 2**-6): gelu_quant.error_bound, which the GPU benchmark also
   checks. The scales are amax / 448 of rows whose amax differ by at most delta of the largest element.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kontext_rt.kernels import gelu_quant, reference
from kontext_rt.model import fp8_linear as f8
from tests.kernel_inputs import DTYPES

# (rows, A, M): FLUX's single block at 1:4 (A = C, M = 4C) scaled down with ragged widths, a double block MLP's
# second linear (A = 0), widths around fp8_quant's 4096-wide tile (a ragged tail beyond one tile), one row
SHAPES = [(71, 24, 96), (83, 40, 150), (53, 0, 200), (5, 3000, 5000), (1, 7, 9)]


def inputs(rows, a, m, dtype, seed=0):
    """attn ~ N(0, 1); mlp_in spread over GELU's whole shape (linear, curved, the negative tail, zeros), rows of
    different magnitudes so some rows' amax comes from attn and others' from GELU."""
    gen = torch.Generator().manual_seed(seed)
    attn = torch.randn(rows, a, generator=gen) * torch.logspace(-1, 0.5, rows)[:, None]
    mlp = torch.randn(rows, m, generator=gen) * 3
    mlp[:, : min(m, 4)] = torch.tensor([0.0, -8.0, 12.0, -0.5])[: min(m, 4)]
    return attn.to(dtype), mlp.to(dtype)


def kernel_gelu(mlp_in: torch.Tensor) -> torch.Tensor:
    """The interpreter's GELU bit for bit: kernels/gelu_quant.py's INTERPRET branch in numpy float32, rounded to
    mlp_in's dtype (round to nearest even, as the kernel's explicit bf16 rounding and float16 cast do)."""
    f = np.float32
    x = mlp_in.float().numpy()
    inner = f(0.7978845608028654) * (x + f(0.044715) * (x * x * x))
    g = x / (f(1) + np.exp(f(-2) * np.clip(inner, f(-20), f(20))))
    return torch.from_numpy(g).to(mlp_in.dtype)


def fused(attn, mlp_in):
    """The kernel writing into NaN-poisoned outputs (0x7F is e4m3's NaN): an element it skips fails."""
    rows, width = mlp_in.shape[0], mlp_in.shape[1] + (0 if attn is None else attn.shape[1])
    q = torch.full((rows, width), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)
    scale = torch.full((rows, 1), float("nan"))
    out = gelu_quant.gelu_quantize_rows(attn, mlp_in, out=(q, scale))
    assert out[0] is q and out[1] is scale
    assert not torch.isnan(q.float()).any() and not torch.isnan(scale).any(), "an element was not written"
    return q, scale


def assert_bit_for_bit(got, want):
    assert torch.equal(got[1], want[1]), "scales differ"
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)), "e4m3 bytes differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_quantize_rows_of_the_cat_of_its_own_gelu(dtype, shape):
    attn, mlp = inputs(*shape, dtype)
    a = attn if shape[1] else None
    h = kernel_gelu(mlp)
    want = f8.quantize_rows(h if a is None else torch.cat((attn, h), -1))
    assert_bit_for_bit(fused(a, mlp), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reads_strided_rows(dtype):
    """attn and mlp_in as column slices of one wider projection output (the single block's layout: linear1 writes
    qkv and mlp_in side by side), and a transposed-then-sliced view with a row stride larger than its width."""
    attn, mlp = inputs(37, 40, 130, dtype)
    wide = torch.cat((torch.zeros(37, 5, dtype=dtype), attn, mlp, torch.zeros(37, 3, dtype=dtype)), -1)
    a_view, m_view = wide[:, 5:45], wide[:, 45:175]
    assert a_view.stride(0) == m_view.stride(0) == 178
    want = f8.quantize_rows(torch.cat((attn, kernel_gelu(mlp)), -1))
    assert_bit_for_bit(fused(a_view, m_view), want)
    assert_bit_for_bit(fused(None, m_view), f8.quantize_rows(kernel_gelu(mlp)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_within_the_derived_bound_of_the_reference(dtype, shape):
    """gelu_quant.error_bound (derivation there and in this module's docstring), after checking its premise on
    the kernel's own GELU values: within delta of torch's."""
    attn, mlp = inputs(*shape, dtype, seed=1)
    a = attn if shape[1] else None
    (qk, sk), (qr, sr) = fused(a, mlp), reference.gelu_quantize_rows(a, mlp)
    g_r = F.gelu(mlp, approximate="tanh").double()
    g_k = kernel_gelu(mlp).double()
    assert (g_k != g_r).any(), "the two GELUs agree everywhere: the bound is not exercised"
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(g_r.abs().clamp(min=torch.finfo(dtype).tiny))))
    delta_g = ulp + 2 * torch.finfo(torch.float32).eps * mlp.double().abs()
    assert ((g_k - g_r).abs() <= delta_g).all(), "the premise: the two GELUs within delta"
    row_delta = delta_g.amax(-1, keepdim=True)
    eps32 = torch.finfo(torch.float32).eps
    assert ((sk.double() - sr.double()).abs() * 448 <= row_delta + 448 * eps32 * sr.double()).all(), "scales"
    err = (qk.double() * sk.double() - qr.double() * sr.double()).abs()
    bound = gelu_quant.error_bound(a, mlp, sk, sr)
    assert (err <= bound).all(), f"max error over bound {(err / bound).max().item():.3g}"
    # attn is copied exactly: in every row whose scales agree its bytes are the reference's
    same = (sk == sr)[:, 0]
    assert same.any()
    assert torch.equal(qk[same, : shape[1]].view(torch.uint8), qr[same, : shape[1]].view(torch.uint8))


def test_zero_rows_and_rows_of_zeros():
    q, scale = gelu_quant.gelu_quantize_rows(torch.zeros(0, 4), torch.zeros(0, 8))
    assert q.shape == (0, 12) and scale.shape == (0, 1)
    attn, mlp = torch.zeros(3, 4), torch.zeros(3, 8)
    assert_bit_for_bit(fused(attn, mlp), reference.gelu_quantize_rows(attn, mlp))


def test_launcher_names_the_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="attn is torch.float16 but the other inputs are torch.float32"):
        gelu_quant.gelu_quantize_rows(x.half(), x)
    with pytest.raises(ValueError, match=r"attn has shape \(5, 8\), expected \(4, \*\)"):
        gelu_quant.gelu_quantize_rows(torch.randn(5, 8), x)
    with pytest.raises(ValueError, match="mlp_in must have a contiguous last dimension"):
        gelu_quant.gelu_quantize_rows(None, x.t())
    with pytest.raises(ValueError, match="its width must be at least 1"):
        gelu_quant.gelu_quantize_rows(None, torch.randn(4, 0))
    with pytest.raises(TypeError, match="mlp_in must be float32, float16 or bfloat16"):
        gelu_quant.gelu_quantize_rows(None, x.double())
    with pytest.raises(ValueError, match=r"out q must be a contiguous \(4, 16\) float8_e4m3fn"):
        gelu_quant.gelu_quantize_rows(x, x, out=(torch.empty(4, 8, dtype=torch.float8_e4m3fn), torch.empty(4, 1)))


@pytest.mark.parametrize("with_attn", [True, False])
def test_the_op_passes_opcheck(with_attn):
    attn, mlp = inputs(6, 8 if with_attn else 0, 24, torch.bfloat16)
    args = (attn if with_attn else None, mlp)
    torch.library.opcheck(gelu_quant.gelu_quantize_rows_op, args, test_utils=("test_schema", "test_faketensor"))
    assert_bit_for_bit(gelu_quant.gelu_quantize_rows_op(*args), gelu_quant.gelu_quantize_rows(*args))


def fp8_layer(in_features, out_features, gen):
    from torch import nn

    linear = nn.Linear(in_features, out_features).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen) / in_features**0.5)
    return f8.FP8Linear.from_linear(linear, matmul=f8.scaled_mm_dequantized)


def test_gelu_linear_eager_is_the_unfused_fp8_layer_and_triton_runs_the_kernel():
    """transformer.gelu_linear, as the single block's linear2 and the double MLP's second linear call it: with the
    eager table, a dynamic FP8 linear gives exactly its unfused output (the eager FP8 path keeps its bits); with
    the kernel in the table, the product of the kernel's q and scale; a static FP8 or plain linear never calls it."""
    from kontext_rt.kernels import ops as kernels
    from kontext_rt.model.op_table import EAGER_OPS, Ops
    from kontext_rt.model.transformer import gelu_linear, mlp, mlp_forward

    gen = torch.Generator().manual_seed(2)
    b, length, a, m, n = 2, 7, 24, 40, 16
    layer = fp8_layer(a + m, n, gen)
    attn = torch.randn(b, length, a, generator=gen).bfloat16()
    mlp_in = (3 * torch.randn(b, length, 8 + m, generator=gen)).bfloat16()[..., 8:]  # a slice, as torch.split gives
    unfused = layer(torch.cat((attn, F.gelu(mlp_in, approximate="tanh")), -1))
    assert torch.equal(gelu_linear(layer, attn, mlp_in, EAGER_OPS), unfused)
    triton_ops = Ops(gelu_quantize_rows=kernels.gelu_quantize_rows)
    q, scale = gelu_quant.gelu_quantize_rows(attn.reshape(-1, a), mlp_in.reshape(-1, m))
    assert torch.equal(gelu_linear(layer, attn, mlp_in, triton_ops), layer.product(q, scale, (b, length), attn.dtype))

    def refuse(*_):
        raise AssertionError("the fused op was called for a layer it does not apply to")

    static = f8.FP8Linear(layer.weight, layer.weight_scale, layer.bias, matmul=f8.scaled_mm_dequantized)
    static.input_scale = torch.tensor(0.05)
    never = Ops(gelu_quantize_rows=refuse)
    want = static(torch.cat((attn, F.gelu(mlp_in, approximate="tanh")), -1))
    assert torch.equal(gelu_linear(static, attn, mlp_in, never), want)

    seq = mlp(32, m).to(torch.bfloat16)
    x = torch.randn(b, length, 32, generator=gen).bfloat16()
    assert torch.equal(mlp_forward(seq, x, never), seq(x))  # bf16: the Sequential itself
    seq[2] = fp8_layer(m, 32, gen)
    assert torch.equal(mlp_forward(seq, x, EAGER_OPS), seq(x))
    q, scale = gelu_quant.gelu_quantize_rows(None, seq[0](x).reshape(-1, m))
    assert torch.equal(mlp_forward(seq, x, triton_ops), seq[2].product(q, scale, (b, length), x.dtype))
