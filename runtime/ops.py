"""The op table the model calls for its attention-path and elementwise work.

Every backend supplies the same four ops; the eager table below is the reference (plain torch, the numerics of
REFERENCE.md section 2.3 and 3.3). Shapes: q, k, v (B, H, L, D); x (B, L, C); shift/scale/gate (B, 1, C);
cos/sin (L, D/2) float32, one angle per interleaved pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-6  # every LayerNorm and QK RMSNorm in FLUX


def rms_norm(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-head RMSNorm computed in float32, cast back, then the learned scale (BFL QKNorm)."""
    y = F.rms_norm(x.float(), x.shape[-1:], eps=EPS).to(x.dtype)  # one fused pass instead of five
    return y * scale.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) by the per-pair angle, in float32."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def qk_norm_rope(q, k, q_scale, k_scale, cos, sin):
    """QK RMSNorm then RoPE, for one block's q and k."""
    return apply_rope(rms_norm(q, q_scale), cos, sin), apply_rope(rms_norm(k, k_scale), cos, sin)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Joint non-causal attention, default scale 1/sqrt(D); returns (B, L, H*D)."""
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(1 + scale) * LayerNorm(x) + shift, LayerNorm without affine."""
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=EPS) + shift


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + gate * y


@dataclass(frozen=True)
class Ops:
    """The swappable op table. A backend replaces entries; the model code never changes."""

    qk_norm_rope: Callable = qk_norm_rope
    attention: Callable = attention
    modulate: Callable = modulate
    gated_residual: Callable = gated_residual


EAGER_OPS = Ops()
