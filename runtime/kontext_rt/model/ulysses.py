"""Ulysses sequence parallelism (DeepSpeed-Ulysses) over a torch.distributed process group of N ranks.

Layout (docs/python-api.md, Sequence parallelism): the image tokens [target | context...] are split into N
contiguous shards whose sizes differ by at most one (shard_sizes), no padding: rank r holds its shard and runs
every linear, norm and MLP on it. The T text tokens are replicated on every rank (the double blocks' text stream
is recomputed per rank: T = 512 rows against 8192 / N image rows, cheaper than moving it). Attention
(UlyssesAttention) turns sequence shards into head shards with one all-to-all of q, k, v, runs the op table's own
attention unchanged for H/N heads over the whole sequence [text | all image tokens] in its original order (so the
full RoPE table applies as it is, and norm + RoPE happen inside the inner op exactly as in one process), sends the
image outputs back to their token shards with a second all-to-all and all-gathers the text outputs over heads, so
the text stream stays identical on every rank.
The sharding is uneven rather than padded, so there are no padding tokens to leak into any softmax.

The modulation table is replicated: it depends only on t, guidance and the pooled text, (S, B, K) numbers for a
whole loop, computed once; sharding it would save nothing and add a collective per layer.

Shapes: q, k, v (B, H, T + L_r, D) with L_r this rank's image tokens; cos, sin (T + L, D/2) for the whole sequence.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from kontext_rt.model.op_table import Ops
from kontext_rt.model.transformer import FirstBlock


def shard_sizes(length: int, world: int) -> list[int]:
    """Contiguous shards of `length` tokens over `world` ranks, the first length % world one token larger."""
    base, extra = divmod(length, world)
    return [base + (r < extra) for r in range(world)]


class UlyssesAttention:
    """An op table's attention with this rank's image tokens sharded over the group and the text replicated.

    Same signature as Ops.attention; `inner` is the wrapped op table's attention (eager reference or triton), called
    for this rank's H/N heads over the whole sequence: the single-process path is not touched."""

    def __init__(self, inner, group, text_len: int, sizes: list[int]):
        self.inner, self.group, self.text_len, self.sizes = inner, group, text_len, sizes
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def __call__(self, q, k, v, q_scales, k_scales, split, cos, sin):
        t, world, heads = self.text_len, self.world, q.shape[1]
        assert heads % world == 0, f"{heads} heads over {world} ranks (LoadSpec checks this)"
        assert q.shape[2] == t + self.sizes[self.rank], (q.shape, t, self.sizes)
        h = heads // world
        mine = slice(self.rank * h, (self.rank + 1) * h)
        img = self.heads_of_all_tokens(torch.stack((q[:, :, t:], k[:, :, t:], v[:, :, t:])))  # (3, B, h, L, D)
        txt = torch.stack((q[:, mine, :t], k[:, mine, :t], v[:, mine, :t]))  # replicated: no communication
        q, k, v = torch.cat((txt, img), 3).unbind(0)
        out = self.inner(q, k, v, q_scales, k_scales, split, cos, sin)  # (B, T + L, h*D)
        return torch.cat((self.gather_heads(out[:, :t]), self.tokens_of_all_heads(out[:, t:])), 1)

    def heads_of_all_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(3, B, H, L_r, D) this rank's tokens, every head -> (3, B, H/N, L, D) every token, this rank's heads."""
        three, b, heads, n_r, d = x.shape
        world, h = self.world, heads // self.world
        # dim 0 is what all_to_all_single splits: chunk j (tokens of this rank, heads of rank j) goes to rank j
        send = x.view(three, b, world, h, n_r, d).permute(2, 4, 0, 1, 3, 5)
        send = send.reshape(world * n_r, three, b, h, d).contiguous()  # reshape may keep a strided view
        recv = send.new_empty(sum(self.sizes), three, b, h, d)  # chunk j: rank j's tokens, in rank (= token) order
        dist.all_to_all_single(recv, send, self.sizes, [n_r] * world, group=self.group)
        return recv.permute(1, 2, 3, 0, 4)

    def tokens_of_all_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, L, H/N * D) every token, this rank's heads -> (B, L_r, H * D) this rank's tokens, every head."""
        b, _, hd = y.shape
        world, n_r = self.world, self.sizes[self.rank]
        send = y.transpose(0, 1).contiguous()  # (L, B, hD): rank j's tokens go back to rank j
        recv = send.new_empty(world * n_r, b, hd)  # chunk j: this rank's tokens, rank j's heads
        dist.all_to_all_single(recv, send, [n_r] * world, self.sizes, group=self.group)
        return recv.view(world, n_r, b, hd).permute(2, 1, 0, 3).reshape(b, n_r, world * hd)

    def gather_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, T, H/N * D) the text outputs of this rank's heads -> (B, T, H * D), the same on every rank."""
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        return torch.cat(parts, -1)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one step's sequence is split: the text length, every rank's image-token count (sizes) and target-token
    count (targets: a shard is contiguous over [target | context], so its targets come first), and this rank."""

    text: int
    sizes: tuple[int, ...]
    targets: tuple[int, ...]
    rank: int

    @property
    def start(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def local(self) -> slice:
        """This rank's image tokens in [target | context]."""
        return slice(self.start, self.start + self.sizes[self.rank])


class SequenceParallel:
    """FluxTransformer's loop interface (modulation_table, velocity, first_block, remaining_blocks, output, the
    per-step call) with the image tokens sharded over `group`: what the denoisers (sampling/denoisers.py) and the step
    cache (sampling/step_cache.py) run in place of the model, unchanged.

    Every rank is given the same whole inputs (state, context, text, the whole sequence's cos/sin) and returns the
    same whole velocity (B, N, 64): the sampler's state stays identical everywhere. first_block gives this rank's
    shard (its FirstBlock.n: the target tokens in the shard; .layout: the split), remaining_blocks the shard's
    target tokens, and output gathers every rank's velocity rows. The wrapped model is the pipeline's transformer
    itself, so a LoRA fused into it (the same file on every rank) is used here as well."""

    def __init__(self, model, group):
        self.model, self.group = model, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if model.cfg.num_heads % self.world:
            raise ValueError(f"{model.cfg.num_heads} heads cannot be split over {self.world} ranks")
        self.cfg, self.mod_widths = model.cfg, model.mod_widths
        # one op table per (op table, text length, shards): a torch.compile'd block or a graph cache sees the same
        # object at every step of a loop, not a new one per call
        self._tables: dict[tuple, Ops] = {}

    def layout(self, n: int, total: int, text: int) -> Layout:
        """The split of `total` image tokens, the first `n` of them targets, after `text` text tokens."""
        sizes = shard_sizes(total, self.world)
        targets = [min(max(n - sum(sizes[:r]), 0), sizes[r]) for r in range(self.world)]
        return Layout(text, tuple(sizes), tuple(targets), self.rank)

    def ops_for(self, ops: Ops, layout: Layout) -> Ops:
        key = (id(ops), layout.text, layout.sizes)
        table = self._tables.get(key)
        if table is None or table.attention.inner is not ops.attention:
            attention = UlyssesAttention(ops.attention, self.group, layout.text, list(layout.sizes))
            table = self._tables[key] = dataclasses.replace(ops, attention=attention)
        return table

    def modulation_table(self, timesteps, guidance, pooled, ops: Ops) -> torch.Tensor:
        return self.model.modulation_table(timesteps, guidance, pooled, ops)  # replicated (module docstring)

    def first_block(self, img, ctx, txt, mods, cos, sin, ops: Ops) -> FirstBlock:
        """FluxTransformer.first_block over this rank's shard of [img | ctx] (B, N + M, 64); cos/sin of the whole
        sequence."""
        x = img if ctx is None else torch.cat((img, ctx), 1)
        layout = self.layout(img.shape[1], x.shape[1], txt.shape[1])
        # the shard enters as the image stream (context None: the shard already holds its context tokens)
        first = self.model.first_block(x[:, layout.local], None, txt, mods, cos, sin, self.ops_for(ops, layout))
        return first._replace(n=layout.targets[self.rank], layout=layout)

    def remaining_blocks(self, first: FirstBlock, mods, cos, sin, ops: Ops) -> torch.Tensor:
        """The last hidden state of the shard's target tokens, (B, targets[rank], C)."""
        return self.model.remaining_blocks(first, mods, cos, sin, self.ops_for(ops, first.layout))

    def output(self, hidden: torch.Tensor, mods, ops: Ops, layout: Layout) -> torch.Tensor:
        """The final layer on the shard's target tokens, then every rank's rows: the velocity (B, N, 64)."""
        return self.gather_targets(self.model.output(hidden, mods, ops), list(layout.targets))

    def velocity(self, img, ctx, txt, mod, cos, sin, ops: Ops) -> torch.Tensor:
        """FluxTransformer.velocity: img (B, N, 64), ctx (B, M, 64) or None, cos/sin of the whole sequence."""
        mods = mod.split(self.mod_widths, -1)
        first = self.first_block(img, ctx, txt, mods, cos, sin, ops)
        return self.output(self.remaining_blocks(first, mods, cos, sin, ops), mods, ops, first.layout)

    def gather_targets(self, v: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(B, counts[rank], C) per rank -> (B, sum(counts), C) on every rank. all_gather takes equal sizes: each
        part is padded to the largest count, and the padding is cut off again (it never enters any computation)."""
        most = max(counts)
        padded = torch.cat((v, v.new_zeros(v.shape[0], most - v.shape[1], v.shape[2])), 1)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:, :c] for part, c in zip(parts, counts, strict=True)], 1)

    def sum_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the group, the same bits on every rank (the step cache's decision number is made of it)."""
        dist.all_reduce(x, group=self.group)
        return x

    def __call__(self, img, ctx, txt, pooled, timesteps, guidance, cos, sin, ops: Ops) -> torch.Tensor:
        """FluxTransformer.forward (the per-step denoiser's call): this step's modulation, then velocity."""
        mod = self.modulation_table(timesteps[None], guidance, pooled, ops)[0]
        return self.velocity(img, ctx, txt, mod, cos, sin, ops)
