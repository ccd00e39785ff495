"""Fused adaLN modulation and gated residual (kernels/modulation.py) against the plain-torch reference."""

import pytest
import torch

from kontext_rt.kernels import reference
from kontext_rt.kernels.modulation import gated_residual, modulate
from tests.kernel_inputs import DTYPES, assert_close, double, poisoned


def _rows(B, L, C, dtype, gen, strided):
    """x as the model has it: contiguous, or a strided slice of a wider tensor (the [txt | img] split)."""
    if strided:
        return (torch.randn(B, L + 3, C + 8, generator=gen) * 3 + 1).to(dtype)[:, 3:, :C]
    return (torch.randn(B, L, C, generator=gen) * 3 + 1).to(dtype)


def _vectors(B, C, n, dtype, gen):
    """shift/scale/gate as chunks of one modulation projection: (B, 1, C) views with batch stride n*C."""
    return (0.5 * torch.randn(B, 1, n * C, generator=gen)).to(dtype).chunk(n, -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [96, 100, 256])
@pytest.mark.parametrize("strided", [False, True])
def test_modulate_matches_reference(dtype, C, strided):
    gen = torch.Generator().manual_seed(C)
    x = _rows(2, 13, C, dtype, gen, strided)
    shift, scale = _vectors(2, C, 2, dtype, gen)
    out = poisoned(2, 13, C, dtype=dtype)
    assert modulate(x, shift, scale, out=out) is out
    truth = reference.modulate(*double((x, shift, scale)))
    assert_close(out, truth, reference.modulate(x, shift, scale), dtype, f"modulate {dtype} C={C}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [96, 100])
@pytest.mark.parametrize("strided", [False, True])
def test_gated_residual_matches_reference(dtype, C, strided):
    gen = torch.Generator().manual_seed(C + 1)
    x, y = _rows(2, 13, C, dtype, gen, strided), _rows(2, 13, C, dtype, gen, not strided)
    (gate,) = _vectors(2, C, 1, dtype, gen)
    out = poisoned(2, 13, C, dtype=dtype)
    assert gated_residual(x, gate, y, out=out) is out
    truth = reference.gated_residual(*double((x, gate, y)))
    assert_close(out, truth, reference.gated_residual(x, gate, y), dtype, f"gated residual {dtype} C={C}")


def test_each_sample_gets_its_own_vectors():
    """Batch rows use their own shift/scale: swapping the batch order of the vectors swaps the outputs."""
    gen = torch.Generator().manual_seed(0)
    x = _rows(2, 5, 32, torch.float32, gen, False)
    shift, scale = _vectors(2, 32, 2, torch.float32, gen)
    a = modulate(x, shift, scale)
    b = modulate(x, shift.flip(0).contiguous(), scale.flip(0).contiguous())
    assert not torch.allclose(a, b)
    torch.testing.assert_close(modulate(x[:1], shift[1:], scale[1:]), b[:1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "fn,change,match",
    [
        (modulate, dict(shift=torch.zeros(2, 1, 16)), r"shift has shape \(2, 1, 16\), expected \(2, 1, 32\)"),
        (modulate, dict(scale=torch.zeros(1, 1, 32)), r"scale has shape \(1, 1, 32\), expected \(2, 1, 32\)"),
        (modulate, dict(x=torch.zeros(2, 32)), r"x must be \(B, L, C\)"),
        (modulate, dict(shift=torch.zeros(2, 1, 32, dtype=torch.bfloat16)), "shift is torch.bfloat16"),
        (modulate, dict(x=torch.zeros(2, 32, 5).transpose(1, 2)), "contiguous last dimension"),
    ],
)
def test_bad_inputs_name_the_problem(fn, change, match):
    args = dict(x=torch.zeros(2, 5, 32), shift=torch.zeros(2, 1, 32), scale=torch.zeros(2, 1, 32)) | change
    with pytest.raises((ValueError, TypeError), match=match):
        fn(**args)


def test_gated_residual_shape_mismatch():
    with pytest.raises(ValueError, match=r"y has shape \(2, 4, 32\), expected \(2, 5, 32\)"):
        gated_residual(torch.zeros(2, 5, 32), torch.zeros(2, 1, 32), torch.zeros(2, 4, 32))
