"""The FLUX MMDiT (docs/model.md), BFL parameter names, one op table for the hot ops.

Shapes: img (B, N, 64) target tokens, ctx (B, M, 64) context tokens, txt (B, T, context_in_dim),
pooled (B, vec_in_dim), timesteps/guidance (B,) as sigma and the guidance scale (both x1000 inside),
cos/sin (T+N+M, head_dim/2) from rope.rope_table.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kontext_rt.config import FluxConfig
from kontext_rt.errors import InputError
from kontext_rt.model.fp8_linear import FP8Linear
from kontext_rt.model.op_table import EAGER_OPS, Ops
from kontext_rt.model.residency import RESIDENT

TIME_FACTOR = 1000.0  # t and guidance are embedded as 1000 * value
TIME_EMBED_DIM = 256


def timestep_embedding(t: torch.Tensor, dim: int = TIME_EMBED_DIM, max_period: float = 10_000.0) -> torch.Tensor:
    """[cos | sin] sinusoid of 1000 * t, float32: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * TIME_FACTOR)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x, ops: Ops = EAGER_OPS):
        h = F.silu(ops.row_linear(x, self.in_layer.weight, self.in_layer.bias))
        return ops.row_linear(h, self.out_layer.weight, self.out_layer.bias)


class ModulationOut(NamedTuple):
    shift: torch.Tensor  # (B, 1, C)
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    """lin(SiLU(vec)): (shift, scale, gate) x (2 if double else 1), computed by the model for all blocks at once."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)


def chunk_modulation(mod: torch.Tensor, multiplier: int) -> list[ModulationOut]:
    """(B, multiplier * C) -> [ModulationOut] of (B, 1, C) views, in the order (shift, scale, gate)[, ...]."""
    out = mod[:, None, :].chunk(multiplier, dim=-1)
    return [ModulationOut(*out[i : i + 3]) for i in range(0, multiplier, 3)]


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    """The per-stream projections of a double block; attention itself is joint across streams."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (3, B, H, L, D)."""
        return self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def gelu_linear(linear: nn.Module, attn: torch.Tensor | None, mlp_in: torch.Tensor, ops: Ops) -> torch.Tensor:
    """linear(cat(attn, GELU_tanh(mlp_in))) (attn None: linear(GELU_tanh(mlp_in))), attn (B, L, A), mlp_in
    (B, L, M). A dynamic FP8 linear takes its e4m3 input from ops.gelu_quantize_rows, which the triton table runs as
    one kernel (no bf16 GELU written, no cat, no re-read: 36.6 GB per FP8 step in the single blocks alone,
    benchmarks/results/cpu-op-traffic-2026-12-07); the eager table's composite gives the unfused bits. Any other
    linear (bf16, static FP8) sees the unfused composite, unchanged."""
    if not (isinstance(linear, FP8Linear) and linear.dynamic):
        h = F.gelu(mlp_in, approximate="tanh")
        return linear(h if attn is None else torch.cat((attn, h), -1))
    rows = mlp_in.reshape(-1, mlp_in.shape[-1])
    q, scale = ops.gelu_quantize_rows(None if attn is None else attn.reshape(-1, attn.shape[-1]), rows)
    return linear.product(q, scale, mlp_in.shape[:-1], mlp_in.dtype)


def mlp_forward(mlp: nn.Sequential, x: torch.Tensor, ops: Ops) -> torch.Tensor:
    """A double block's MLP (Linear, GELU, Linear) on x; with gelu_linear's fused input when its output linear is
    a dynamic FP8 linear, else the Sequential itself."""
    out = mlp[2]
    if isinstance(out, FP8Linear) and out.dynamic:
        return gelu_linear(out, None, mlp[0](x), ops)
    return mlp(x)


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.img_mod = Modulation(dim, double=True)
        self.img_attn = SelfAttention(dim, cfg.num_heads)
        self.img_mlp = mlp(dim, cfg.mlp_hidden)
        self.txt_mod = Modulation(dim, double=True)
        self.txt_attn = SelfAttention(dim, cfg.num_heads)
        self.txt_mlp = mlp(dim, cfg.mlp_hidden)

    def forward(self, img, txt, img_mod, txt_mod, cos, sin, ops: Ops):
        """img_mod / txt_mod: (B, 6C) rows of the modulation table (FluxTransformer.modulations)."""
        img_m1, img_m2 = chunk_modulation(img_mod, 6)
        txt_m1, txt_m2 = chunk_modulation(txt_mod, 6)

        # projections per stream, then one joint attention over [txt | img]
        img_q, img_k, img_v = self.img_attn.qkv_heads(ops.modulate(img, img_m1.shift, img_m1.scale))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(ops.modulate(txt, txt_m1.shift, txt_m1.scale))
        t = txt.shape[1]
        q_scales = (self.txt_attn.norm.query_norm.scale, self.img_attn.norm.query_norm.scale)
        k_scales = (self.txt_attn.norm.key_norm.scale, self.img_attn.norm.key_norm.scale)
        q, k, v = (torch.cat(pair, 2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = ops.attention(q, k, v, q_scales, k_scales, t, cos, sin)  # text tokens normed with the text scales
        txt_attn, img_attn = attn[:, :t], attn[:, t:]

        # gated residuals: attention, then MLP
        img = ops.gated_residual(img, img_m1.gate, self.img_attn.proj(img_attn))
        img = ops.gated_residual(
            img, img_m2.gate, mlp_forward(self.img_mlp, ops.modulate(img, img_m2.shift, img_m2.scale), ops)
        )
        txt = ops.gated_residual(txt, txt_m1.gate, self.txt_attn.proj(txt_attn))
        txt = ops.gated_residual(
            txt, txt_m2.gate, mlp_forward(self.txt_mlp, ops.modulate(txt, txt_m2.shift, txt_m2.scale), ops)
        )
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence; linear1 fuses q, k, v and the MLP input."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.split = [3 * dim, cfg.mlp_hidden]
        self.linear1 = nn.Linear(dim, 3 * dim + cfg.mlp_hidden)
        self.linear2 = nn.Linear(dim + cfg.mlp_hidden, dim)
        self.norm = QKNorm(cfg.head_dim)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x, mod, cos, sin, ops: Ops):
        """mod: (B, 3C), this block's row of the modulation table."""
        (mod,) = chunk_modulation(mod, 3)
        qkv, mlp_in = torch.split(self.linear1(ops.modulate(x, mod.shift, mod.scale)), self.split, -1)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q_scales, k_scales = (self.norm.query_norm.scale,) * 2, (self.norm.key_norm.scale,) * 2
        attn = ops.attention(q, k, v, q_scales, k_scales, 0, cos, sin)
        out = gelu_linear(self.linear2, attn, mlp_in, ops)
        return ops.gated_residual(x, mod.gate, out)


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, mod, ops: Ops):
        """mod: (B, 2C), the adaLN row of the modulation table (adaLN_modulation = SiLU, then its linear)."""
        shift, scale = mod[:, None, :].chunk(2, dim=-1)  # BFL order: shift, scale
        return self.linear(ops.modulate(x, shift, scale))


class FirstBlock(NamedTuple):
    """What FluxTransformer.first_block gives: the image stream [target | context] (B, N+M, C) and text stream
    (B, T, C) after double block 0, the image stream before it, and N, the target token count. Under sequence
    parallelism (model/ulysses.py) x is this rank's shard, n its target tokens and layout the split; None here."""

    x: torch.Tensor
    txt: torch.Tensor
    x_in: torch.Tensor
    n: int
    layout: object = None


class FluxTransformer(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, dim)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, dim) if cfg.guidance_embed else None
        self.txt_in = nn.Linear(cfg.context_in_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(dim, cfg.in_channels)
        # columns of the modulation table per layer, in modulation_layers() order (fixed by the config)
        self.mod_widths = [6 * dim] * (2 * cfg.depth) + [3 * dim] * cfg.depth_single_blocks + [2 * dim]
        # asked before each block and modulation layer is used: a placement that keeps them in host memory
        # (kontext_rt.transformer_placement) brings them to the device for their turn; by default everything is resident
        self.residency = RESIDENT

    def modulation_layers(self) -> list[nn.Linear]:
        """Every linear applied to SiLU(vec), in the order of the modulation table's columns."""
        layers = [lin for b in self.double_blocks for lin in (b.img_mod.lin, b.txt_mod.lin)]
        layers += [b.modulation.lin for b in self.single_blocks]
        return layers + [self.final_layer.adaLN_modulation[1]]

    def modulations(self, vecs: list[torch.Tensor], ops: Ops = EAGER_OPS) -> list[torch.Tensor]:
        """The modulation table of each group of rows: every block's lin(SiLU(vec)) side by side, (R, K) for each
        vec (R, C) of `vecs`.

        It depends on nothing but t, guidance and the pooled text, so the sampler computes it for all steps before
        the loop (modulation_table): one matmul per layer over all steps' rows, instead of reading these 3.2B
        parameters again at every step. Each layer is visited once for all groups (a placement that streams them
        copies each one once), and each group is its own matmul, so its rows never depend on the other groups'.
        """
        acts = [F.silu(vec) for vec in vecs]
        cols: list[list[torch.Tensor]] = [[] for _ in vecs]
        with self.residency.modulation_table():
            for i, lin in enumerate(self.modulation_layers()):
                with self.residency.modulation_layer(i):
                    for group, act in zip(cols, acts, strict=True):
                        group.append(ops.row_linear(act, lin.weight, lin.bias))
        return [torch.cat(group, -1) for group in cols]

    def _vec(self, timesteps, guidance, pooled, ops: Ops) -> torch.Tensor:
        """time_in(emb(t)) + guidance_in(emb(g)) + vector_in(pooled): timesteps (S, B), guidance (B,) or None,
        pooled (B, D) -> (S, B, C). The guidance and pooled-text terms are the same at every step: computed for B
        rows once and broadcast."""
        steps, batch = timesteps.shape
        dtype = self.img_in.weight.dtype
        vec = self.time_in(timestep_embedding(timesteps.reshape(-1)).to(dtype), ops).view(steps, batch, -1)
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype), ops)
        return vec + self.vector_in(pooled.to(dtype), ops)

    def modulation_table(self, timesteps, guidance, pooled, ops: Ops = EAGER_OPS) -> torch.Tensor:
        """(S, B, K): the modulations of every step for timesteps (S, B), guidance (B,) or None, pooled (B, D).

        vec = time_in(emb(t)) + guidance_in(emb(g)) + vector_in(pooled), then every block's lin(SiLU(vec)). forward
        calls it with S = 1; with a row-invariant row_linear (the triton table) row (s, b) of a many-step table
        equals that one-step table bit for bit. With ops.rows_apart (the runtime's tables) each batch row is computed
        on its own, so a request's table never depends on what it is batched with.
        """
        steps, batch = timesteps.shape
        if self.guidance_in is not None and guidance is None:
            raise InputError("this model was distilled with guidance: pass a guidance value")
        if not ops.rows_apart:
            vec = self._vec(timesteps, guidance, pooled, ops).reshape(steps * batch, -1)
            return self.modulations([vec], ops)[0].view(steps, batch, -1)
        vecs = [
            self._vec(
                timesteps[:, b : b + 1], None if guidance is None else guidance[b : b + 1], pooled[b : b + 1], ops
            ).reshape(steps, -1)
            for b in range(batch)
        ]
        return torch.stack(self.modulations(vecs, ops), 1)

    def velocity(self, img, ctx, txt, mod, cos, sin, ops: Ops = EAGER_OPS):
        """The transformer with its modulation given: mod (B, K), one step's rows of the modulation table."""
        mods = mod.split(self.mod_widths, -1)
        first = self.first_block(img, ctx, txt, mods, cos, sin, ops)
        return self.output(self.remaining_blocks(first, mods, cos, sin, ops), mods, ops)

    def first_block(self, img, ctx, txt, mods, cos, sin, ops: Ops = EAGER_OPS) -> FirstBlock:
        """The input projections and double block 0: where the step cache (sampling/step_cache.py) decides whether
        to run the rest. mods: mod.split(self.mod_widths, -1)."""
        x = img if ctx is None else torch.cat((img, ctx), 1)
        x = self.img_in(x)
        txt = self.txt_in(txt)
        with self.residency.block(0):
            out, txt = self.double_blocks[0](x, txt, mods[0], mods[1], cos, sin, ops)
        return FirstBlock(out, txt, x, img.shape[1])

    def remaining_blocks(self, first: FirstBlock, mods, cos, sin, ops: Ops = EAGER_OPS) -> torch.Tensor:
        """Every block after the first, from its output: the last hidden state of the target tokens, (B, N, C)."""
        x, txt = first.x, first.txt
        residency, depth = self.residency, len(self.double_blocks)
        for i in range(1, depth):
            with residency.block(i):
                x, txt = self.double_blocks[i](x, txt, mods[2 * i], mods[2 * i + 1], cos, sin, ops)
        t, n = txt.shape[1], first.n
        x = torch.cat((txt, x), 1)
        for i, block in enumerate(self.single_blocks):
            with residency.block(depth + i):
                x = block(x, mods[2 * depth + i], cos, sin, ops)
        # only the target tokens leave the model: the final layer is per token, context outputs are never used
        return x[:, t : t + n]

    def output(self, hidden: torch.Tensor, mods, ops: Ops = EAGER_OPS, layout=None) -> torch.Tensor:
        """The final layer over the target tokens' last hidden state (B, N, C): the velocity (B, N, in_channels).
        layout: FirstBlock.layout, None in one process (SequenceParallel.output gathers the ranks' rows by it)."""
        return self.final_layer(hidden, mods[-1], ops)

    def forward(self, img, ctx, txt, pooled, timesteps, guidance, cos, sin, ops: Ops = EAGER_OPS):
        """Velocity of the target tokens, (B, N, in_channels). ctx may be None (text-to-image).

        The modulation table of this one step, then velocity: the same code path as the hoisted loop's."""
        mod = self.modulation_table(timesteps[None], guidance, pooled, ops)[0]
        return self.velocity(img, ctx, txt, mod, cos, sin, ops)
