"""Triton device functions of the attention kernel (rope_attention.py); qk_norm_rope.py uses load_angles.

RoPE rotates interleaved pairs (x[2j], x[2j+1]), so the attention kernel loads q and k tiles as their even and odd
columns, (BLOCK, D/2) each: the rotation is then elementwise, and attention scores are q_even . k_even + q_odd .
k_odd, two dots over D/2 without re-interleaving. (Loading the full tile and splitting it in registers instead cost
hundreds of bytes of register spills per thread on sm_90 in every attention configuration tried. The norm+RoPE
kernel, with no attention tiles to hold, loads whole rows and splits them: stride-2 loads there made every access
2 bytes.)
"""

import triton
import triton.language as tl


@triton.jit
def load_scale_halves(s_ptr, HALF: tl.constexpr):
    """A (D,) learned RMSNorm scale -> its even and odd entries, (HALF,) float32 each."""
    pairs = tl.arange(0, HALF)
    return tl.load(s_ptr + 2 * pairs).to(tl.float32), tl.load(s_ptr + 2 * pairs + 1).to(tl.float32)


@triton.jit
def load_halves(ptr, rows, stride_l, mask, HALF: tl.constexpr, MASKED: tl.constexpr):
    """Rows of a (L, 2*HALF) matrix as its even and odd columns, (BLOCK, HALF) each, in the input dtype."""
    offs = rows[:, None] * stride_l + 2 * tl.arange(0, HALF)[None, :]
    if MASKED:
        return (
            tl.load(ptr + offs, mask=mask[:, None], other=0.0),
            tl.load(ptr + offs + 1, mask=mask[:, None], other=0.0),
        )
    return tl.load(ptr + offs), tl.load(ptr + offs + 1)


@triton.jit
def norm_rope_halves(
    e, o, rows, split, se0, so0, se1, so1, cos, sin, eps, HALF: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr
):
    """Even/odd halves (BLOCK, HALF) -> the same, normalized and rotated, float32.

    NORM: RMSNorm over the whole row, then the learned scale (se0/so0 for rows < split, se1/so1 for the rest).
    ROPE: rotate each pair by its angle; cos/sin (BLOCK, HALF) float32.
    """
    e = e.to(tl.float32)
    o = o.to(tl.float32)
    if NORM:
        rstd = tl.math.rsqrt((tl.sum(e * e, axis=1) + tl.sum(o * o, axis=1)) / (2 * HALF) + eps)[:, None]
        first = (rows < split)[:, None]
        e = e * rstd * tl.where(first, se0[None, :], se1[None, :])
        o = o * rstd * tl.where(first, so0[None, :], so1[None, :])
    if ROPE:
        e, o = e * cos - o * sin, e * sin + o * cos
    return e, o


@triton.jit
def load_angles(cos_ptr, sin_ptr, rows, mask, HALF: tl.constexpr):
    """cos/sin (L, HALF) float32 rows -> (BLOCK, HALF) each; masked rows read 0."""
    offs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    return (
        tl.load(cos_ptr + offs, mask=mask[:, None], other=0.0),
        tl.load(sin_ptr + offs, mask=mask[:, None], other=0.0),
    )
