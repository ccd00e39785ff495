"""Inputs and the tolerance rule shared by the kernel tests.

Tolerance (from a reference, not a constant): the kernel's max error against the float64 reference may be at most
twice torch's own error in the same dtype, plus one unit of the dtype's rounding at the output's magnitude (the
interpreter truncates float32 -> bfloat16 where a GPU rounds, which costs up to one ulp).
"""

from __future__ import annotations

import torch

from kontext_rt.config import infer_axes_dim
from kontext_rt.model.rope import rope_table, sequence_ids

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# text + target + context token counts, scaled-down FLUX layouts that are not multiples of any block size:
# one context image (7 + 40 + 24 = 71), two (7 + 40 + 24 + 12 = 83), text-to-image (5 + 48 = 53), and an exact
# multiple of the interpreter's 64-token tile (128: no masked tail)
LAYOUTS = {
    "one-context": (7, [(5, 8), (4, 6)]),
    "two-contexts": (7, [(5, 8), (4, 6), (3, 4)]),
    "text-to-image": (5, [(6, 8)]),
    "no-tail": (16, [(8, 8), (6, 8)]),
}


def rope_tables(text: int, grids, head_dim: int):
    return rope_table(sequence_ids(text, grids), infer_axes_dim(head_dim), 10_000)


def qkv(batch, heads, length, head_dim, dtype, gen, strided=True):
    """q, k, v (B, H, L, D): strided views of one (B, L, 3, H, D) projection, as the model makes them."""
    if strided:
        x = torch.randn(batch, length, 3, heads, head_dim, generator=gen).to(dtype)
        return x.permute(2, 0, 3, 1, 4).unbind(0)
    return tuple(torch.randn(batch, heads, length, head_dim, generator=gen).to(dtype) for _ in range(3))


def norm_scales(head_dim, dtype, gen):
    """Text and image scales of a double block; around 2 so the softmax is peaked, as trained FLUX norms make it."""
    return tuple((2 + 0.5 * torch.randn(head_dim, generator=gen)).to(dtype) for _ in range(2))


def poisoned(*shape, dtype):
    """An output buffer full of NaN: an element the kernel does not write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype)


def assert_close(out, truth, torch_out, dtype, what=""):
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (an element was not written)"
    err = (out.double() - truth).abs().max().item()
    torch_err = (torch_out.double() - truth).abs().max().item()
    bound = 2 * torch_err + torch.finfo(dtype).eps * truth.abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (torch's own {dtype} error {torch_err:.3g})"


def double(ts):
    return tuple(t.double() for t in ts)
