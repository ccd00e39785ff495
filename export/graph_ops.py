"""The op table the export stage traces: the eager numerics, written with ops both ONNX exporters translate.

The eager references (kontext_rt.kernels.reference) use `F.rms_norm`, `unflatten` and a normalized shape taken
from the input, which the TorchScript exporter (the one ModelOpt's FP8 Q/DQ export needs) cannot translate. Here
RMSNorm is written out, RoPE reads the even and odd columns by strided slices, and the LayerNorm width is a Python
int. Same math, same precision rules (norm and rotation in float32, cast back); tests/test_onnx_export.py checks
the graphs against the eager model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kontext_rt.kernels.reference import EPS, attention, compute_dtype, gated_residual
from kontext_rt.model.op_table import Ops


def rms_norm(x: torch.Tensor, scales, split: int) -> torch.Tensor:
    """RMSNorm over D in float32, cast back, times scales[0] for tokens < split and scales[1] for the rest."""
    xf = x.to(compute_dtype(x))
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    if split <= 0:
        return y * scales[1].to(x.dtype)
    # a slice and a concat, not a mask: the TorchScript tracer records the slice bound as dynamic, an arange not
    return torch.cat((y[..., :split, :] * scales[0].to(x.dtype), y[..., split:, :] * scales[1].to(x.dtype)), -2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) in float32; even and odd columns read by strided slices."""
    xf = x.to(compute_dtype(x))
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def rope_attention(q, k, v, q_scales, k_scales, split, cos, sin):
    q = apply_rope(rms_norm(q, q_scales, split), cos, sin)
    k = apply_rope(rms_norm(k, k_scales, split), cos, sin)
    return attention(q, k, v)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(1 + scale) * LayerNorm(x) + shift; the width as a Python int, so the tracer records a constant."""
    return (1 + scale) * F.layer_norm(x, (int(x.shape[-1]),), eps=EPS) + shift


EXPORT_OPS = Ops(attention=rope_attention, modulate=modulate, gated_residual=gated_residual, rows_apart=False)
