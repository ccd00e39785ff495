"""The op table the model calls for its attention-path and elementwise work.

Every backend supplies the same three ops; the eager table is the plain-torch reference in
kontext_rt.kernels.reference (the numerics docs/model.md states), which the Triton kernels are
tested against. Shapes: q, k, v (B, H, L, D); x (B, L, C); shift/scale/gate (B, 1, C); cos/sin (L, D/2) float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F

from kontext_rt.kernels import reference
from kontext_rt.model import fp8_linear as fp8


@dataclass(frozen=True)
class Ops:
    """The swappable op table. A backend replaces entries; the model code never changes.

    attention(q, k, v, q_scales, k_scales, split, cos, sin) -> (B, L, H*D): QK RMSNorm (scales[0] for tokens
    before `split`, scales[1] after), RoPE, joint attention. modulate(x, shift, scale), gated_residual(x, gate, y).
    row_linear(x (R, K), w, b): the conditioning and modulation linears, whose rows are one per image and step;
    the triton table's kernel is row-invariant, so hoisting them out of the loop changes no bit (transformer.py).
    quantize_rows(x (R, K)) -> (e4m3, scale (R, 1)): the activation quantizer of FP8 linears.
    gelu_quantize_rows(attn (R, A) or None, mlp_in (R, M)) -> (e4m3 (R, A + M), scale (R, 1)): quantize_rows of
    cat(attn, GELU_tanh(mlp_in)), the input of a dynamic FP8 linear2 (or double block MLP output linear) in one
    pass; the eager value is that composite, so the eager FP8 path keeps its bits (transformer.gelu_linear).
    rows_apart: the modulation table computes each batch row on its own (its S rows one matmul per layer), so a
    request's table never depends on the rows it is batched with (a BLAS may round by shape); a traced graph keeps
    one matmul over all rows instead (export/graph_ops: a Python loop over the batch would fix its size).
    """

    attention: Callable = reference.rope_attention
    modulate: Callable = reference.modulate
    gated_residual: Callable = reference.gated_residual
    row_linear: Callable = F.linear
    quantize_rows: Callable = fp8.quantize_rows
    gelu_quantize_rows: Callable = reference.gelu_quantize_rows
    head_dims: tuple[int, ...] | None = None  # the head dims the ops support; None: any
    rows_apart: bool = True


EAGER_OPS = Ops()
