"""Checkpoint key maps: each of the runtime's tensors (BFL names) from one or more checkpoint tensors.

One table per layout drives both directions: loading (checkpoint -> runtime) and writing the diffusers layout
(runtime -> checkpoint, used by the demo). docs/model.md names the parts.

The transformer's module names, public because the checkpoint loader and the LoRA reader share them:
- GLOBAL_NAMES: BFL module -> diffusers module, outside the blocks;
- DOUBLE_BLOCK_NAMES, SINGLE_BLOCK_NAMES: BFL module -> diffusers module inside block i (BLOCK_GROUPS gives each
  table's BFL and diffusers block prefixes); a tuple of diffusers modules is one fused BFL tensor, its rows split
  by fused_split;
- SWAPPED: the one module whose two output halves are in the other order in diffusers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

import torch


class Kind(Enum):
    COPY = "copy"
    CAT = "cat"  # sources concatenated along dim 0 (fused qkv / linear1)
    SWAP = "swap"  # the two halves along dim 0 exchanged (final adaLN: diffusers scale|shift vs BFL shift|scale)
    CONV1X1 = "conv1x1"  # a linear [o, i] in the checkpoint, a 1x1 conv [o, i, 1, 1] in the runtime


@dataclass(frozen=True)
class Rule:
    target: str
    sources: tuple[str, ...]
    kind: Kind = Kind.COPY
    split: tuple[int, ...] = ()  # CAT: rows per source

    def source_shapes(self, target_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        if self.kind is Kind.CAT:
            return [(n, *target_shape[1:]) for n in self.split]
        if self.kind is Kind.CONV1X1:
            return [tuple(target_shape[:2])]
        return [tuple(target_shape)]

    def combine(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.kind is Kind.CAT:
            return torch.cat(tensors, 0)
        (t,) = tensors
        if self.kind is Kind.SWAP:
            a, b = t.chunk(2, 0)
            return torch.cat((b, a), 0)
        if self.kind is Kind.CONV1X1:
            return t[:, :, None, None]
        return t

    def separate(self, t: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of combine: the checkpoint tensors for one runtime tensor."""
        if self.kind is Kind.CAT:
            return list(torch.split(t, list(self.split), 0))
        if self.kind is Kind.CONV1X1:
            return [t[:, :, 0, 0]]
        return [self.combine([t])]  # COPY is the identity; SWAP is its own inverse


def identity_rules(shapes: dict[str, tuple[int, ...]]) -> list[Rule]:
    return [Rule(k, (k,)) for k in shapes]


# ---- transformer: diffusers FluxTransformer2DModel names ----------------------------------------------------------

GLOBAL_NAMES = MappingProxyType(
    {
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "final_layer.linear": "proj_out",
        "final_layer.adaLN_modulation.1": "norm_out.linear",
    }
)
DOUBLE_BLOCK_NAMES = MappingProxyType(
    {
        "img_mod.lin": "norm1.linear",
        "txt_mod.lin": "norm1_context.linear",
        "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "img_attn.norm.query_norm": "attn.norm_q",
        "img_attn.norm.key_norm": "attn.norm_k",
        "txt_attn.norm.query_norm": "attn.norm_added_q",
        "txt_attn.norm.key_norm": "attn.norm_added_k",
        "img_attn.proj": "attn.to_out.0",
        "txt_attn.proj": "attn.to_add_out",
        "img_mlp.0": "ff.net.0.proj",
        "img_mlp.2": "ff.net.2",
        "txt_mlp.0": "ff_context.net.0.proj",
        "txt_mlp.2": "ff_context.net.2",
    }
)
SINGLE_BLOCK_NAMES = MappingProxyType(
    {
        "modulation.lin": "norm.linear",
        "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
        "linear2": "proj_out",
        "norm.query_norm": "attn.norm_q",
        "norm.key_norm": "attn.norm_k",
    }
)
# (BFL block list, diffusers block list, module table)
BLOCK_GROUPS = (
    ("double_blocks", "transformer_blocks", DOUBLE_BLOCK_NAMES),
    ("single_blocks", "single_transformer_blocks", SINGLE_BLOCK_NAMES),
)
SWAPPED = "final_layer.adaLN_modulation.1"  # diffusers norm_out.linear: scale | shift, BFL: shift | scale
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)\.(weight|bias|scale)$")
_PLAIN = re.compile(r"^(.+)\.(weight|bias)$")


def fused_split(parts: tuple[str, ...], rows: int, hidden: int) -> tuple[int, ...]:
    """Rows of each diffusers part inside one fused BFL tensor of `rows` rows: q, k, v of `hidden` rows each, then
    (a single block's linear1, four parts) the MLP input, the rest."""
    split = (hidden,) * 3 + ((rows - 3 * hidden,) if len(parts) == 4 else ())
    if len(parts) not in (3, 4) or sum(split) != rows or min(split) <= 0:
        raise ValueError(f"{rows} rows cannot hold {', '.join(parts)} with hidden size {hidden}")
    return split


def diffusers_transformer_rules(shapes: dict[str, tuple[int, ...]]) -> list[Rule]:
    """Rules for every runtime transformer tensor (given as name -> shape) from diffusers names."""
    hidden = shapes["img_in.weight"][0]
    prefixes = {bfl: (diff, table) for bfl, diff, table in BLOCK_GROUPS}
    rules = []
    for key, shape in shapes.items():
        if m := _BLOCK.match(key):
            group, i, module, param = m.groups()
            prefix, table = prefixes[group]
            src = table[module]
            param = "weight" if param == "scale" else param
            if isinstance(src, tuple):
                split = fused_split(src, shape[0], hidden)
                rules.append(Rule(key, tuple(f"{prefix}.{i}.{s}.{param}" for s in src), Kind.CAT, split))
            else:
                rules.append(Rule(key, (f"{prefix}.{i}.{src}.{param}",)))
        else:
            module, param = _PLAIN.match(key).groups()
            kind = Kind.SWAP if module == SWAPPED else Kind.COPY
            rules.append(Rule(key, (f"{GLOBAL_NAMES[module]}.{param}",), kind))
    return rules


# ---- VAE: diffusers AutoencoderKL names ---------------------------------------------------------------------------


def _vae_name(key: str, levels: int) -> str:
    """LDM (ae.safetensors) name -> diffusers AutoencoderKL name."""
    subs = [
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
        (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
        (r"\.mid\.attn_1\.(q|k|v)\.", lambda m: f".mid_block.attentions.0.to_{m[1]}."),
        (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets."),
        (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
    ]
    for pattern, repl in subs:
        key = re.sub(pattern, repl, key)
    return key


def diffusers_vae_rules(shapes: dict[str, tuple[int, ...]], levels: int) -> list[Rule]:
    rules = []
    for key, shape in shapes.items():
        conv1x1 = ".attn_1." in key and key.endswith(".weight") and len(shape) == 4
        rules.append(Rule(key, (_vae_name(key, levels),), Kind.CONV1X1 if conv1x1 else Kind.COPY))
    return rules
