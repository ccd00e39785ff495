"""The attention pre-pass kernel (kernels/prepass.py) against reference.attention_prepass, under TRITON_INTERPRET.

Tolerances come from the reference (STYLE.md habit 7). Without fp8: the kernel tests' rule (tests/kernel_inputs.py),
error against the float64 reference <= 2 x torch's own error in the dtype + 1 ulp. With fp8, derived from e4m3's
rounding: the kernel must quantize its own (non-fp8) values exactly as reference.quantize_per_head does (bit for
bit), and against the reference's e4m3 output each dequantized value may differ by one e4m3 step at its magnitude
times the descale, plus however far the two pre-rounding values are apart; each descale by that distance / 448
plus one float32 rounding.
"""

import pytest
import torch

from kontext_rt.kernels import prepass, reference
from tests.kernel_inputs import DTYPES, assert_close, double, norm_scales, qkv, rope_tables

# 7 text + 12 target + 6 context = 25 tokens: no block size divides it
RAGGED = (7, [(3, 4), (2, 3)])
HEAD_DIMS = [32, 64, 128]  # 32: the tiny test model's; 64, 128: FLUX's is 128
SPLITS = [0, 7, 13]  # no text scale; the text | image boundary; inside the target tokens


@pytest.fixture(params=["one-tile", "several-tiles"])
def tiles(request, monkeypatch):
    """One 128-row tile, or 4-row tiles (25 = 6 x 4 + 1: a one-row masked tail) whose 7 partials the finalize
    kernel reduces 2 at a time (a masked last step)."""
    if request.param == "several-tiles":
        monkeypatch.setattr(prepass, "BLOCK_L_INTERPRET", 4)
        monkeypatch.setattr(prepass, "BLOCK_PARTIALS", 2)
    return request.param


def inputs(dtype, head_dim, seed, batch=2, heads=3, strided=True):
    gen = torch.Generator().manual_seed(seed)
    cos, sin = rope_tables(*RAGGED, head_dim)
    q, k, v = qkv(batch, heads, cos.shape[0], head_dim, dtype, gen, strided=strided)
    return q, k, v, norm_scales(head_dim, dtype, gen), norm_scales(head_dim, dtype, gen), cos, sin


def both_references(q, k, v, qs, ks, split, cos, sin, **flags):
    """(float64 truth, torch in the inputs' dtype)."""
    truth = reference.attention_prepass(
        q.double(), k.double(), v.double(), double(qs), double(ks), split, cos, sin, **flags
    )
    return truth, reference.attention_prepass(q, k, v, qs, ks, split, cos, sin, **flags)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("smooth_k", [False, True], ids=["plain", "smooth_k"])
def test_matches_reference_without_fp8(dtype, head_dim, split, smooth_k, tiles):
    q, k, v, qs, ks, cos, sin = inputs(dtype, head_dim, seed=head_dim + split)
    B, H, L, D = q.shape
    got = prepass.attention_prepass(q, k, v, qs, ks, split, cos, sin, smooth_k=smooth_k)
    assert got[3:] == (None, None, None)
    truth, same_dtype = both_references(q, k, v, qs, ks, split, cos, sin, smooth_k=smooth_k)
    for name, o, t, s in zip("qkv", got[:3], truth[:3], same_dtype[:3], strict=True):
        assert o.shape == (B, L, H, D) and o.is_contiguous() and o.dtype == dtype, (name, o.shape, o.dtype)
        assert_close(o, t, s, dtype, f"{name} {dtype} D={head_dim} split={split} smooth_k={smooth_k} {tiles}")


def e4m3_step(scaled: torch.Tensor) -> torch.Tensor:
    """The spacing of e4m3 values at each magnitude: 2^(floor(log2|x|) - 3), 2^-9 among the subnormals."""
    exp = torch.floor(torch.log2(scaled.abs().clamp_min(2.0**-6)))
    return torch.exp2(exp - 3)


def assert_fp8_close(got, ref, got_descale, ref_descale, got_values, ref_values, what):
    """got/ref: e4m3 (B, L, H, D); descales (B, H); *_values: the (B, L, H, D) values each side quantized."""
    apart = (got_values.double() - ref_values.double()).abs()  # how far the pre-rounding values are
    f32_rounding = torch.finfo(torch.float32).eps * torch.maximum(got_descale, ref_descale).double()
    descale_bound = apart.amax(dim=(1, 3)) / reference.E4M3_MAX + f32_rounding
    descale_err = (got_descale.double() - ref_descale.double()).abs()
    assert (descale_err <= descale_bound).all(), f"{what}: descales {got_descale} vs {ref_descale}"
    d_got, d_ref = (d.double()[:, None, :, None] for d in (got_descale, ref_descale))
    a, b = got.double() * d_got, ref.double() * d_ref
    step = e4m3_step(torch.maximum(got.double().abs(), ref.double().abs())) * torch.maximum(d_got, d_ref)
    excess = (a - b).abs() - (step + apart)
    assert excess.max() <= 0, f"{what}: {(excess > 0).sum()} dequantized values more than one e4m3 step apart"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("split", [0, 7])
@pytest.mark.parametrize("smooth_k", [False, True], ids=["plain", "smooth_k"])
def test_fp8_matches_reference(dtype, head_dim, split, smooth_k, tiles):
    q, k, v, qs, ks, cos, sin = inputs(dtype, head_dim, seed=head_dim + split + 1)
    v = v.clone()
    v[1, 2] = 0  # an all-zero head: descale 1, as quantize_per_head makes it
    B, H, L, D = q.shape
    args = (q, k, v, qs, ks, split, cos, sin)
    got = prepass.attention_prepass(*args, fp8=True, smooth_k=smooth_k)
    plain = prepass.attention_prepass(*args, smooth_k=smooth_k)[:3]
    ref = reference.attention_prepass(*args, fp8=True, smooth_k=smooth_k)
    ref_plain = reference.attention_prepass(*args, smooth_k=smooth_k)[:3]
    what = f"{dtype} D={head_dim} split={split} smooth_k={smooth_k} {tiles}"
    assert got[5][1, 2] == 1 and not got[2][1, :, 2].float().any(), f"{what}: zero head"
    for i, name in enumerate("qkv"):
        values, descale = got[i], got[3 + i]
        assert values.shape == (B, L, H, D) and values.is_contiguous() and values.dtype == torch.float8_e4m3fn
        assert descale.shape == (B, H) and descale.dtype == torch.float32
        # the kernel's e4m3 values are its own non-fp8 output quantized as torch does it, bit for bit
        own_q, own_d = reference.quantize_per_head(plain[i])
        assert torch.equal(descale, own_d), f"{name} {what}: descale {descale} != quantize_per_head's {own_d}"
        assert torch.equal(values.view(torch.uint8), own_q.view(torch.uint8)), f"{name} {what}: e4m3 bits"
        assert_fp8_close(values, ref[i], descale, ref[3 + i], plain[i], ref_plain[i], f"{name} {what}")


def test_smoothing_removes_the_mean_of_k(seed):
    """k's mean over tokens after smoothing is 0 up to the rounding of each value to bfloat16 (and q, v are the
    unsmoothed ones)."""
    q, k, v, qs, ks, cos, sin = inputs(torch.bfloat16, 64, seed=3)
    plain = prepass.attention_prepass(q, k, v, qs, ks, 7, cos, sin)
    smooth = prepass.attention_prepass(q, k, v, qs, ks, 7, cos, sin, smooth_k=True)
    assert torch.equal(plain[0], smooth[0]) and torch.equal(plain[2], smooth[2])
    mean = smooth[1].double().mean(dim=1)
    ulp = torch.finfo(torch.bfloat16).eps * smooth[1].double().abs().amax(dim=1)
    assert (mean.abs() <= ulp).all() and plain[1].double().mean(dim=1).abs().amax() > ulp.amax()


def test_contiguous_inputs_and_one_head(seed):
    q, k, v, qs, ks, cos, sin = inputs(torch.float16, 128, seed=4, batch=1, heads=1, strided=False)
    got = prepass.attention_prepass(q, k, v, qs, ks, 7, cos, sin, fp8=True, smooth_k=True)
    plain = prepass.attention_prepass(q, k, v, qs, ks, 7, cos, sin, smooth_k=True)[:3]
    truth, same_dtype = both_references(q, k, v, qs, ks, 7, cos, sin, smooth_k=True)
    for o, t, s in zip(plain, truth[:3], same_dtype[:3], strict=True):
        assert_close(o, t, s, torch.float16, "contiguous")
    ref = reference.attention_prepass(q, k, v, qs, ks, 7, cos, sin, fp8=True, smooth_k=True)
    for i in range(3):
        assert_fp8_close(got[i], ref[i], got[3 + i], ref[3 + i], plain[i], same_dtype[i], "contiguous")


def test_e4m3_step():
    x = torch.tensor([448.0, 256.0, 255.9, 1.0, 2.0**-6, 2.0**-8, 0.0], dtype=torch.float64)
    assert e4m3_step(x).tolist() == [32.0, 32.0, 16.0, 0.125, 2.0**-9, 2.0**-9, 2.0**-9]


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(v=torch.zeros(1, 2, 9, 32, dtype=torch.float16)), "v is torch.float16 but the other inputs are"),
        (dict(v=torch.zeros(1, 2, 8, 32)), r"v has shape \(1, 2, 8, 32\), expected \(1, 2, 9, 32\)"),
        (dict(v=torch.zeros(1, 2, 32, 9).transpose(2, 3)), "v must have a contiguous last dimension"),
        (dict(k_scales=torch.ones(32)), "k_scales must be a pair"),
        (dict(cos=torch.zeros(9, 15)), r"cos has shape \(9, 15\), expected \(9, 16\)"),
    ],
)
def test_bad_inputs_name_the_problem(change, match):
    x = torch.zeros(1, 2, 9, 32)
    args = dict(q=x, k=x, v=x, q_scales=(torch.ones(32),) * 2, k_scales=(torch.ones(32),) * 2, split=0)
    args |= dict(cos=torch.zeros(9, 16), sin=torch.zeros(9, 16)) | change
    with pytest.raises((ValueError, TypeError), match=match):
        prepass.attention_prepass(**args, fp8=True)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_the_op_passes_opcheck_and_keeps_the_reference_signature(fp8):
    from kontext_rt.kernels import ops

    q, k, v, qs, ks, cos, sin = inputs(torch.bfloat16, 32, seed=5, batch=1, heads=2)
    op = torch.ops.kontext_rt.attention_prepass.default
    torch.library.opcheck(
        op, (q, k, v, *qs, *ks, 7, cos, sin, fp8, True), test_utils=("test_schema", "test_faketensor")
    )
    got = ops.attention_prepass(q, k, v, qs, ks, 7, cos, sin, fp8=fp8, smooth_k=True)
    want = prepass.attention_prepass(q, k, v, qs, ks, 7, cos, sin, fp8=fp8, smooth_k=True)
    for g, w in zip(got, want, strict=True):
        assert (g is None and w is None) or torch.equal(g.view(torch.uint8), w.view(torch.uint8))
