"""The op table the model calls for its attention-path and elementwise work.

Every backend supplies the same three ops; the eager table is the plain-torch reference in
kontext_rt.kernels.reference (the numerics of REFERENCE.md sections 2.3 and 3.3), which the Triton kernels are
tested against. Shapes: q, k, v (B, H, L, D); x (B, L, C); shift/scale/gate (B, 1, C); cos/sin (L, D/2) float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .kernels import reference


@dataclass(frozen=True)
class Ops:
    """The swappable op table. A backend replaces entries; the model code never changes.

    attention(q, k, v, q_scales, k_scales, split, cos, sin) -> (B, L, H*D): QK RMSNorm (scales[0] for tokens
    before `split`, scales[1] after), RoPE, joint attention. modulate(x, shift, scale), gated_residual(x, gate, y).
    """

    attention: Callable = reference.rope_attention
    modulate: Callable = reference.modulate
    gated_residual: Callable = reference.gated_residual
    head_dims: tuple[int, ...] | None = None  # the head dims the ops support; None: any


EAGER_OPS = Ops()
