"""The kernels as registered torch ops (kontext_rt::*), with the signatures of the runtime's op table.

Importing this module imports triton and registers the ops; the runtime does so only when the `triton` backend
is chosen.
"""

from __future__ import annotations

from kontext_rt.kernels import (
    _launch,
    fp8_quant,
    gelu_quant,
    modulation,
    prepass,
    qk_norm_rope,
    reference,
    rope_attention,
    row_linear,
)

HEAD_DIMS = _launch.HEAD_DIMS
modulate = modulation.modulate_op
gated_residual = modulation.gated_residual_op
row_linear_op = row_linear.row_linear_op
quantize_rows = fp8_quant.quantize_rows_op
gelu_quantize_rows = gelu_quant.gelu_quantize_rows_op  # (attn or None, mlp_in) -> (q, scale)


def attention(q, k, v, q_scales, k_scales, split, cos, sin):
    """QK RMSNorm and RoPE applied as q and k tiles are loaded, inside the flash attention kernel."""
    return rope_attention.rope_attention_op(q, k, v, *q_scales, *k_scales, split, cos, sin, True, True)


def attention_prerotated(q, k, v, q_scales, k_scales, split, cos, sin):
    """The same result in two kernels: one pass writes normalized, rotated q and k; plain flash attention reads
    them. It moves 4 (B, H, L, D) tensors more through memory but keeps the attention loop free of RoPE work."""
    q, k = qk_norm_rope.qk_norm_rope_op(q, k, *q_scales, *k_scales, split, cos, sin)
    return rope_attention.rope_attention_op(q, k, v, q, q, q, q, 0, cos, sin, False, False)


def attention_sdpa(q, k, v, q_scales, k_scales, split, cos, sin):
    """The triton backend's attention: the norm+RoPE kernel, then torch's scaled_dot_product_attention, which
    picks its fastest kernel for the device (cuDNN on an H200 with torch 2.11). Measured there at 8704 tokens
    (benchmarks/results/h200-2026-11-28/kernels.json): SDPA with this norm+RoPE kernel 2.5 ms per block, against
    3.0 ms for attention_prerotated and 22 ms for the fused kernel, whose attention loop re-normalizes and
    re-rotates every k tile for every q block."""
    q, k = qk_norm_rope.qk_norm_rope_op(q, k, *q_scales, *k_scales, split, cos, sin)
    return reference.attention(q, k, v)


def attention_prepass(q, k, v, q_scales, k_scales, split, cos, sin, fp8: bool = False, smooth_k: bool = False):
    """reference.attention_prepass's signature and results (descales None without fp8), as one registered op:
    norm, RoPE, optional smoothing of k, FA3's (B, L, H, D) layout and optional per-(batch, head) e4m3."""
    out = prepass.attention_prepass_op(q, k, v, *q_scales, *k_scales, split, cos, sin, fp8, smooth_k)
    return out if fp8 else (*out[:3], None, None, None)


def interpreted() -> bool:
    """True when the kernels were compiled for the Triton interpreter (TRITON_INTERPRET=1 at first import)."""
    return _launch.interpreted(rope_attention._rope_attention_kernel)
