"""Plain-torch references for every kernel in this package: the spec the kernels are tested against.

They are also the runtime's eager ops, so the numerics here are FLUX's own (BFL `math.py`, `layers.py`): QK
RMSNorm in float32 cast back before the learned scale, RoPE on interleaved pairs in float32, LayerNorm without
affine, eps 1e-6. Every function computes in float32 at least and in float64 when given float64, so the tests can
call them on float64 copies as the exact reference and on the kernel's own dtype as "what torch does in that dtype".

Shapes (once, for the whole package):
    q, k, v      (B, H, L, D)   L = T + N + M: text, target and context tokens in one sequence
    cos, sin     (L, D/2)       float32, one angle per interleaved pair (x[2j], x[2j+1])
    q/k scales   (D,) each, a pair (for tokens < split, for tokens >= split): text and image scales of a
                 double block; a single block passes the same scale twice
    x, y         (B, L, C)      shift, scale, gate (B, 1, C)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6  # every LayerNorm and QK RMSNorm in FLUX


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (the exact reference in tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def rms_norm(x: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor], split: int = 0) -> torch.Tensor:
    """Per-head RMSNorm over D in float32, cast back, times the learned scale: scales[0] for tokens < split
    (dim -2), scales[1] for the rest.

    F.rms_norm computes a bf16 or fp16 x in float32 itself and rounds its result once to x's dtype, the same
    values as normalizing x.float() and casting back (bit for bit on the CPU, whose composite upcasts first;
    CUDA's fused kernel runs the same float32 reduction for both dtypes): no float32 copy of q and k is
    written and read back (issue 31; benchmarks/results/cpu-op-traffic-2026-12-07)."""
    y = F.rms_norm(x, x.shape[-1:], eps=EPS)
    if split <= 0:
        return y * scales[1].to(x.dtype)
    y[..., :split, :] *= scales[0].to(x.dtype)
    y[..., split:, :] *= scales[1].to(x.dtype)
    return y


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) by the per-pair angle, in float32.

    Written as x * cos2 + rot(x) * sin2 with cos2, sin2 the angles repeated per pair and rot(x) = (-x[2j+1], x[2j])
    interleaved: the products and sums of (x0 cos - x1 sin, x0 sin + x1 cos) exactly (negation and the order of
    a two-term sum change no bit), over contiguous tensors instead of strided halves."""
    return _rotate(x, *_pair_angles(cos, sin, compute_dtype(x)))


def _pair_angles(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos2, sin2 (L, D): each pair's angle repeated for both of its elements, in the compute dtype."""
    return tuple(t.to(dtype).repeat_interleave(2, dim=-1) for t in (cos, sin))


def _rotate(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """apply_rope with its angles repeated. Only the products and the sum run in float32: rot(x) is made in
    x's dtype (negating and interleaving are exact), a bf16 x times the float32 cos2 is computed in float32 by
    type promotion (the exact upcast of x, as if x.float() were written first), and the float32 sum is rounded
    into x's dtype by the add itself (on a GPU in the same kernel). The same bits as upcasting x and rot(x)
    first, with about half the memory traffic (issue 31; benchmarks/results/cpu-op-traffic-2026-12-07)."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rot = torch.stack((-x1, x0), dim=-1).flatten(-2)
    a, b = x * cos2, rot * sin2
    if torch.is_grad_enabled() and x.requires_grad:  # training (kontext_toy): out= records no gradient
        return (a + b).to(x.dtype)
    return torch.add(a, b, out=torch.empty_like(x))


def qk_norm_rope(q, k, q_scales, k_scales, split, cos, sin):
    """QK RMSNorm then RoPE, for one block's q and k (one table of repeated angles for both)."""
    angles = _pair_angles(cos, sin, compute_dtype(q))
    return _rotate(rms_norm(q, q_scales, split), *angles), _rotate(rms_norm(k, k_scales, split), *angles)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Joint non-causal attention, scale 1/sqrt(D); (B, H, L, D) -> (B, L, H*D)."""
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def rope_attention(q, k, v, q_scales, k_scales, split, cos, sin):
    """What one FLUX block does between its qkv projection and its output projection: (B, L, H*D)."""
    q, k = qk_norm_rope(q, k, q_scales, k_scales, split, cos, sin)
    return attention(q, k, v)


E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
AMAX_FLOOR = 1e-12  # the kernels' floor too: an all-zero row gets a tiny scale, not a division by zero


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference per-row quantizer: (q (R, K) e4m3, scale (R, 1) float32), x ~= q * scale.

    Both divisions are IEEE on every device. The 448 is a device tensor on purpose: on CUDA, torch divides by a
    Python number as a multiplication by its float32 reciprocal, one ulp off the quotient for about half of all
    amax values, so the scales would differ between the CPU and the GPU (and from the Triton kernel)."""
    e4m3_max = torch.full((), E4M3_MAX, dtype=torch.float32, device=x.device)
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=AMAX_FLOOR) / e4m3_max
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, H, D) -> (float8_e4m3fn (B, L, H, D), descale (B, H) float32): one scale per (batch, head) over
    every token and channel, amax / 448 (1 where the head is all zeros), the values divided by it in float32
    and rounded to nearest-even by the cast. descale is what FA3's FP8 forward takes (q_descale etc.: the
    factor that turns the stored values back into the tensor's)."""
    amax = x.to(compute_dtype(x)).abs().amax(dim=(1, 3))  # (B, H)
    descale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).float()
    q = (x.float() / descale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, descale


def attention_prepass(q, k, v, q_scales, k_scales, split, cos, sin, fp8: bool = False, smooth_k: bool = False):
    """What comes before the attention kernel, in the layout FA3 reads: QK RMSNorm and RoPE of q and k (as
    qk_norm_rope), k minus its mean over tokens when smooth_k (SageAttention's smoothing: exact for softmax, which
    is invariant to adding q.m to every score of a query row, and it shrinks k's range before quantization), all
    three transposed from (B, H, L, D) to (B, L, H, D) contiguous, and with fp8 cast to float8_e4m3fn with one
    scale per (batch, head) each (quantize_per_head). Returns (q, k, v, q_descale, k_descale, v_descale); the
    descales are None without fp8, and q, k, v keep the input dtype."""
    q, k = qk_norm_rope(q, k, q_scales, k_scales, split, cos, sin)
    if smooth_k:
        k = (k.to(compute_dtype(k)) - k.to(compute_dtype(k)).mean(dim=2, keepdim=True)).to(k.dtype)
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    if not fp8:
        return q, k, v, None, None, None
    (q, qd), (k, kd), (v, vd) = (quantize_per_head(t) for t in (q, k, v))
    return q, k, v, qd, kd, vd


def attention_fp8_emulated(q, k, v, q_descale, k_descale, v_descale, out_dtype=torch.bfloat16) -> torch.Tensor:
    """FP8 attention as FA3's FP8 forward computes it, emulated: the e4m3 values of (B, L, H, D) q, k, v times
    their per-(batch, head) descales, attention in float32, the output in out_dtype, (B, L, H*D). What the CPU
    can run of an FP8 attention path (its quality cost); FA3 itself also rounds P to e4m3 before P @ V, which
    this leaves out (one rounding fewer: a lower bound of the cost)."""
    deq = [t.float() * d[:, None, :, None] for t, d in ((q, q_descale), (k, k_descale), (v, v_descale))]
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in deq))
    return out.transpose(1, 2).flatten(2).to(out_dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(1 + scale) * LayerNorm(x) + shift, LayerNorm without affine."""
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=EPS) + shift


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y."""
    return x + gate * y


def gelu_quantize_rows(attn: torch.Tensor | None, mlp_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 linear input of a single block's linear2 (attn (R, A), mlp_in (R, M)) or of a double block MLP's
    second linear (attn None): the per-row e4m3 quantization (quantize_rows) of cat(attn, GELU(mlp_in))
    with GELU's tanh approximation, its value rounded to mlp_in's dtype as F.gelu returns it. The unfused path
    exactly, which is what kernels/gelu_quant.py fuses."""
    h = F.gelu(mlp_in, approximate="tanh")
    return quantize_rows(h if attn is None else torch.cat((attn, h), -1))
