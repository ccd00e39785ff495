"""Model configs read from checkpoint files without reading any weights: a diffusers config.json, or the tensor
shapes in a BFL file's safetensors header (BFL files carry no config); and the diffusers config.json of a config,
the inverse of the reading (FluxConfig <-> diffusers in this one module)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kontext_rt.config import FluxConfig, VAEConfig, infer_axes_dim
from kontext_rt.errors import CheckpointError


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None


def diffusers_transformer_config(folder: Path) -> FluxConfig:
    c = read_json(folder / "config.json")
    if c.get("patch_size", 1) != 1 or c.get("out_channels") not in (None, c.get("in_channels", 64)):
        raise CheckpointError(f"{folder / 'config.json'}: unsupported transformer (patch_size 1 and out = in only)")
    try:
        heads, head_dim = c["num_attention_heads"], c["attention_head_dim"]
        return FluxConfig(
            in_channels=c.get("in_channels", 64),
            vec_in_dim=c["pooled_projection_dim"],
            context_in_dim=c["joint_attention_dim"],
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=c["num_layers"],
            depth_single_blocks=c["num_single_layers"],
            axes_dim=tuple(c.get("axes_dims_rope", (16, 56, 56))),
            guidance_embed=bool(c.get("guidance_embeds")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: bad transformer config ({e})") from None


def transformer_config_json(cfg: FluxConfig) -> dict:
    """diffusers' FluxTransformer2DModel config.json of cfg (diffusers_transformer_config reads it back)."""
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": cfg.in_channels,
        "out_channels": None,
        "num_layers": cfg.depth,
        "num_single_layers": cfg.depth_single_blocks,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim,
        "pooled_projection_dim": cfg.vec_in_dim,
        "guidance_embeds": cfg.guidance_embed,
        "axes_dims_rope": list(cfg.axes_dim),
    }


def vae_config_json(cfg: VAEConfig) -> dict:
    """diffusers' AutoencoderKL config.json of cfg (diffusers_vae_config reads it back)."""
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": 1024,
        "scaling_factor": cfg.scale_factor,
        "shift_factor": cfg.shift_factor,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


def bfl_transformer_config(shapes: dict[str, tuple[int, ...]], path: Path) -> FluxConfig:
    """Sizes derived from the tensors themselves; guidance_embed from the presence of guidance_in (schnell has
    none)."""
    try:
        hidden, in_ch = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        return FluxConfig(
            in_channels=in_ch,
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            mlp_ratio=shapes["double_blocks.0.img_mlp.0.weight"][0] / hidden,
            depth=_count(shapes, "double_blocks"),
            depth_single_blocks=_count(shapes, "single_blocks"),
            axes_dim=infer_axes_dim(head_dim),
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: not a FLUX transformer checkpoint (missing tensor {e})") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:  # tensors of the wrong rank or sizes that do not fit
        raise CheckpointError(f"{path}: not a FLUX transformer checkpoint ({e})") from None


def _count(shapes, group: str) -> int:
    return len({int(m[1]) for k in shapes if (m := re.match(rf"{group}\.(\d+)\.", k))})


def diffusers_vae_config(folder: Path) -> VAEConfig:
    c = read_json(folder / "config.json")
    if c.get("use_quant_conv", True) or c.get("use_post_quant_conv", True):
        raise CheckpointError(f"{folder / 'config.json'}: VAE with quant convs is not the FLUX autoencoder")
    try:
        chs = c["block_out_channels"]
        return VAEConfig(
            in_channels=c.get("in_channels", 3),
            ch=chs[0],
            ch_mult=tuple(x // chs[0] for x in chs),
            num_res_blocks=c["layers_per_block"],
            z_channels=c["latent_channels"],
            norm_groups=c["norm_num_groups"],
            scale_factor=c["scaling_factor"],
            shift_factor=c["shift_factor"],
        )
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: bad VAE config ({type(e).__name__}: {e})") from None


def bfl_vae_config(shapes: dict[str, tuple[int, ...]], path: Path) -> VAEConfig:
    try:
        ch = shapes["encoder.conv_in.weight"][0]
        levels = len({int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
        blocks = len({int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
        z = shapes["decoder.conv_in.weight"][1]
    except KeyError as e:
        raise CheckpointError(f"{path}: not a FLUX autoencoder (missing tensor {e})") from None
    if ch % 32:
        raise CheckpointError(f"{path}: {ch} base channels: ae.safetensors files use 32 norm groups")
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=blocks, z_channels=z)
