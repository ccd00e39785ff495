"""FP8 attention as the CPU emulates it (kernels/reference.py: attention_prepass(..., fp8=True), quantize_per_head,
attention_fp8_emulated): its error split into its two sources, each against its own exact side.

1. Quantization alone. e4m3 keeps 3 mantissa bits: rounding to nearest moves a normal value by at most 2^-4 of
   itself; below the smallest normal (2^-6) the spacing is 2^-9, so by at most 2^-10 (in units of the scale). With
   one scale per (batch, head), descale = amax / 448, every element x of that head obeys
       |deq(x) - x| <= 2^-4 |x| + 2^-10 descale.
2. Attention of the dequantized inputs. attention_fp8_emulated computes in float32 and rounds the output to bf16:
   against float64 attention of the same dequantized q, k, v, at most bf16's unit roundoff 2^-8 of each output
   plus twice float32 SDPA's own error (measured here on the same inputs).
The quality cost of both together on a real edit is the quality report's fp8-attention option (docs/quality.md).
"""

import pytest
import torch
import torch.nn.functional as F

from kontext_rt.kernels import reference
from tests.kernel_inputs import LAYOUTS, norm_scales, qkv, rope_tables

U_E4M3, HALF_SUBNORMAL_STEP, U_BF16 = 2.0**-4, 2.0**-10, 2.0**-8


def _heads(gen, zero_head=True):
    """(B, L, H, D) with a different range per (batch, head), one head all zeros (descale 1), and tiny values
    that land on e4m3's subnormals."""
    x = torch.randn(2, 37, 3, 64, generator=gen) * torch.tensor([1e-3, 1.0, 300.0])[None, None, :, None]
    x[:, :5] *= 1e-3  # some rows far below their head's amax: subnormal after scaling
    if zero_head:
        x[1, :, 0] = 0
    return x


def worst_quantization_ratio(x: torch.Tensor, quantized: torch.Tensor, descale: torch.Tensor) -> float:
    """max over elements of |deq - x| / (2^-4 |x| + 2^-10 descale): at most 1 for a correct per-head e4m3."""
    d = descale.double()[:, None, :, None]
    err = (quantized.double() * d - x.double()).abs()
    return (err / (U_E4M3 * x.double().abs() + HALF_SUBNORMAL_STEP * d)).max().item()


def test_quantize_per_head_is_e4m3_rounding_with_one_scale_per_head():
    x = _heads(torch.Generator().manual_seed(0))
    quantized, descale = reference.quantize_per_head(x)
    assert quantized.dtype == torch.float8_e4m3fn and quantized.shape == x.shape
    assert descale.dtype == torch.float32 and descale.shape == (2, 3)
    assert worst_quantization_ratio(x, quantized, descale) <= 1
    amax = x.abs().amax(dim=(1, 3))
    assert torch.equal(descale[amax == 0], torch.ones_like(descale[amax == 0]))
    # each nonzero head's largest element lands on e4m3's largest value, 448
    top = quantized.float().abs().amax(dim=(1, 3))
    assert torch.equal(top[amax > 0], torch.full_like(top[amax > 0], 448.0))


def test_the_quantization_check_fails_on_a_broken_quantizer():
    """The bound above can fail: the values cast without their scale divided out (clamped to +-448), or a scale
    per tensor where the heads' ranges differ (the small heads lose their bits to subnormals)."""
    x = _heads(torch.Generator().manual_seed(0), zero_head=False)
    _, descale = reference.quantize_per_head(x)
    undivided = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert worst_quantization_ratio(x, undivided, descale) > 1
    per_tensor = (x.abs().max() / 448).expand_as(descale)
    coarse = (x / per_tensor[:, None, :, None]).to(torch.float8_e4m3fn)
    assert worst_quantization_ratio(x, coarse, descale) > 1


@pytest.mark.parametrize("smooth_k", [False, True], ids=["plain", "smooth-k"])
@pytest.mark.parametrize("layout", ["one-context", "text-to-image"])
def test_emulated_fp8_attention_is_attention_of_its_dequantized_inputs(layout, smooth_k):
    """The pre-pass's e4m3 q, k, v obey the quantization bound against its unquantized output, and the emulated
    attention is float64 attention of their dequantized values within bf16's output rounding."""
    gen = torch.Generator().manual_seed(1)
    text, grids = LAYOUTS[layout]
    cos, sin = rope_tables(text, grids, 64)
    q, k, v = qkv(2, 3, cos.shape[0], 64, torch.float32, gen)
    args = (q, k, v, norm_scales(64, torch.float32, gen), norm_scales(64, torch.float32, gen), text, cos, sin)
    plain = reference.attention_prepass(*args, smooth_k=smooth_k)[:3]
    pre = reference.attention_prepass(*args, fp8=True, smooth_k=smooth_k)
    for x, quantized, descale in zip(plain, pre[:3], pre[3:], strict=True):
        assert worst_quantization_ratio(x, quantized, descale) <= 1
    out = reference.attention_fp8_emulated(*pre)
    deq = [t.double() * d.double()[:, None, :, None] for t, d in zip(pre[:3], pre[3:], strict=True)]
    exact = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in deq)).transpose(1, 2).flatten(2)
    f32 = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in deq)).transpose(1, 2).flatten(2)
    torch_err = (f32.double() - exact).abs().max().item()
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    assert ((out.double() - exact).abs() <= U_BF16 * exact.abs() + 2 * torch_err).all()
