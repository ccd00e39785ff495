"""Fused QK RMSNorm + RoPE (kernels/qk_norm_rope.py) against the plain-torch reference, under TRITON_INTERPRET."""

import pytest
import torch

from kontext_rt.kernels import reference
from kontext_rt.kernels.qk_norm_rope import qk_norm_rope
from tests.kernel_inputs import DTYPES, LAYOUTS, assert_close, double, norm_scales, poisoned, qkv, rope_tables


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("layout", ["one-context", "two-contexts", "text-to-image"])
def test_matches_reference(dtype, head_dim, layout, seed):
    gen = torch.Generator().manual_seed(head_dim)
    text, grids = LAYOUTS[layout]
    cos, sin = rope_tables(text, grids, head_dim)
    B, H, L = 2, 2, cos.shape[0]
    q, k, _ = qkv(B, H, L, head_dim, dtype, gen)
    qs, ks = norm_scales(head_dim, dtype, gen), norm_scales(head_dim, dtype, gen)
    out = (poisoned(B, H, L, head_dim, dtype=dtype), poisoned(B, H, L, head_dim, dtype=dtype))
    got = qk_norm_rope(q, k, qs, ks, text, cos, sin, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    truth = reference.qk_norm_rope(q.double(), k.double(), double(qs), double(ks), text, cos, sin)
    same_dtype = reference.qk_norm_rope(q, k, qs, ks, text, cos, sin)
    for name, o, t, s in zip("qk", got, truth, same_dtype, strict=True):
        assert_close(o, t, s, dtype, f"{name} {dtype} D={head_dim} {layout}")


@pytest.mark.parametrize("split", [0, 1, 127, 128, 129, 200, 300, 1000])
def test_several_row_blocks_with_a_split_anywhere(split, seed):
    """L = 300 spans three of the interpreter's 128-row blocks (ten GPU blocks) with a masked tail; `split` lands
    before, on, just either side of and past a block boundary."""
    from kontext_rt.kernels.qk_norm_rope import BLOCK_L_INTERPRET

    gen = torch.Generator().manual_seed(split)
    text, grids = 12, [(12, 12), (12, 12)]
    cos, sin = rope_tables(text, grids, 128)
    L = cos.shape[0]
    assert L == 300 and L > 2 * BLOCK_L_INTERPRET and L % BLOCK_L_INTERPRET
    q, k, _ = qkv(1, 2, L, 128, torch.bfloat16, gen)
    qs, ks = norm_scales(128, torch.bfloat16, gen), norm_scales(128, torch.bfloat16, gen)
    got = qk_norm_rope(q, k, qs, ks, split, cos, sin)
    truth = reference.qk_norm_rope(q.double(), k.double(), double(qs), double(ks), split, cos, sin)
    same_dtype = reference.qk_norm_rope(q, k, qs, ks, split, cos, sin)
    for name, o, t, s in zip("qk", got, truth, same_dtype, strict=True):
        assert_close(o, t, s, torch.bfloat16, f"{name} split={split}")


def test_split_selects_the_scales(seed):
    """Tokens before `split` take the first scale, the rest the second: swapping the pair changes exactly those."""
    gen = torch.Generator().manual_seed(1)
    cos, sin = rope_tables(*LAYOUTS["one-context"], 32)
    q, k, _ = qkv(1, 1, cos.shape[0], 32, torch.float32, gen, strided=False)
    qs = norm_scales(32, torch.float32, gen)
    a, _ = qk_norm_rope(q, k, qs, qs, 7, cos, sin)
    b, _ = qk_norm_rope(q, k, qs[::-1], qs, 7, cos, sin)
    assert not torch.allclose(a[:, :, :7], b[:, :, :7]) and not torch.allclose(a[:, :, 7:], b[:, :, 7:])
    c, _ = qk_norm_rope(q, k, (qs[1], qs[1]), qs, 7, cos, sin)
    torch.testing.assert_close(a[:, :, 7:], c[:, :, 7:], rtol=0, atol=0)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(k=torch.zeros(1, 2, 9, 32, dtype=torch.float16)), "k is torch.float16 but the other inputs are"),
        (dict(k=torch.zeros(1, 2, 8, 32)), r"k has shape \(1, 2, 8, 32\), expected \(1, 2, 9, 32\)"),
        (dict(q=torch.zeros(1, 2, 9, 32, dtype=torch.int32)), "q must be float32, float16 or bfloat16"),
        (dict(cos=torch.zeros(9, 15)), r"cos has shape \(9, 15\), expected \(9, 16\)"),
        (dict(sin=torch.zeros(9, 16, dtype=torch.float64)), "sin must be float32"),
        (dict(q_scales=torch.ones(32)), "q_scales must be a pair"),
        (dict(q=torch.zeros(1, 2, 32, 9).transpose(2, 3)), "contiguous last dimension"),
    ],
)
def test_bad_inputs_name_the_problem(change, match):
    args = (
        dict(
            q=torch.zeros(1, 2, 9, 32),
            k=torch.zeros(1, 2, 9, 32),
            q_scales=(torch.ones(32),) * 2,
            k_scales=(torch.ones(32),) * 2,
            split=0,
            cos=torch.zeros(9, 16),
            sin=torch.zeros(9, 16),
        )
        | change
    )
    with pytest.raises((ValueError, TypeError), match=match):
        qk_norm_rope(**args)


def test_unsupported_head_dim():
    x = torch.zeros(1, 1, 4, 80)
    with pytest.raises(ValueError, match=r"head dim 80 is not supported by the Triton kernels \(supported: "):
        qk_norm_rope(x, x, (torch.ones(80),) * 2, (torch.ones(80),) * 2, 0, torch.zeros(4, 40), torch.zeros(4, 40))
