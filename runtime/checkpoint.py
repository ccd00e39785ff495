"""Checkpoint layouts: a diffusers folder or a BFL single file, loaded straight into the runtime's modules.

Models are built on the meta device, then every tensor is read from safetensors, checked against the expected
key set and shapes, cast once and assigned: peak host memory is one copy of the weights.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import VARIANTS, FluxConfig, VAEConfig, Variant, infer_axes_dim
from .mapping import Rule, diffusers_transformer_rules, diffusers_vae_rules, identity_rules
from .model import FluxTransformer
from .safetensors_io import CheckpointError, TensorFiles, digest_file
from .vae import AutoEncoder

BFL_PREFIXES = ("model.diffusion_model.",)
AE_PREFIXES = ("first_stage_model.", "vae.")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_LISTED = 8


@dataclass(frozen=True)
class Layout:
    """Where each component of a checkpoint lives."""

    kind: str  # "diffusers" | "bfl"
    transformer: Path  # diffusers: the transformer/ folder; bfl: the single file
    vae: Path  # diffusers: the vae/ folder; bfl: ae.safetensors
    text_encoders: Path | None  # a folder holding text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/


def detect_layout(path, ae=None, text_encoders=None) -> Layout:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint (a diffusers folder or a flux1-*.safetensors file)")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(
                f"{path}: neither checkpoint layout: a diffusers folder has model_index.json, a BFL checkpoint is "
                "a single .safetensors file"
            )
        return Layout("diffusers", path / "transformer", path / "vae", Path(text_encoders or path))
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors checkpoints are loaded (pickle files never are)")
    ae = Path(ae) if ae else path.parent / "ae.safetensors"
    if not ae.is_file():
        raise CheckpointError(f"{ae}: the autoencoder file is missing (pass ae=PATH to name it)")
    tenc = Path(text_encoders) if text_encoders else path.parent
    return Layout("bfl", path, ae, tenc if (tenc / "text_encoder_2").is_dir() else None)


def _component_files(folder: Path, stem: str) -> TensorFiles:
    """The safetensors of one diffusers component: a single file or a sharded set with its index."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: component folder missing")
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return TensorFiles.from_index(index)
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return TensorFiles([single])
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    hint = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
    raise CheckpointError(f"{folder}: no {stem}.safetensors or sharded index{hint}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None


# ---- configs ------------------------------------------------------------------------------------------------------

def diffusers_transformer_config(folder: Path) -> FluxConfig:
    c = _read_json(folder / "config.json")
    if c.get("patch_size", 1) != 1 or c.get("out_channels") not in (None, c.get("in_channels", 64)):
        raise CheckpointError(f"{folder / 'config.json'}: unsupported transformer (patch_size 1 and out = in only)")
    try:
        heads, head_dim = c["num_attention_heads"], c["attention_head_dim"]
        return FluxConfig(
            in_channels=c.get("in_channels", 64), vec_in_dim=c["pooled_projection_dim"],
            context_in_dim=c["joint_attention_dim"], hidden_size=heads * head_dim, num_heads=heads,
            depth=c["num_layers"], depth_single_blocks=c["num_single_layers"],
            axes_dim=tuple(c.get("axes_dims_rope", (16, 56, 56))), guidance_embed=bool(c.get("guidance_embeds")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: bad transformer config ({e})") from None


def bfl_transformer_config(shapes: dict[str, tuple[int, ...]], path: Path) -> FluxConfig:
    """Sizes derived from the tensors themselves (the file carries no config)."""
    try:
        hidden, in_ch = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        return FluxConfig(
            in_channels=in_ch, vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            context_in_dim=shapes["txt_in.weight"][1], hidden_size=hidden, num_heads=hidden // head_dim,
            mlp_ratio=shapes["double_blocks.0.img_mlp.0.weight"][0] / hidden,
            depth=_count(shapes, "double_blocks"), depth_single_blocks=_count(shapes, "single_blocks"),
            axes_dim=infer_axes_dim(head_dim), guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: not a FLUX transformer checkpoint (missing tensor {e})") from None


def _count(shapes, group: str) -> int:
    return len({int(m[1]) for k in shapes if (m := re.match(rf"{group}\.(\d+)\.", k))})


def diffusers_vae_config(folder: Path) -> VAEConfig:
    c = _read_json(folder / "config.json")
    if c.get("use_quant_conv", True) or c.get("use_post_quant_conv", True):
        raise CheckpointError(f"{folder / 'config.json'}: VAE with quant convs is not the FLUX autoencoder")
    chs = c["block_out_channels"]
    return VAEConfig(
        in_channels=c.get("in_channels", 3), ch=chs[0], ch_mult=tuple(x // chs[0] for x in chs),
        num_res_blocks=c["layers_per_block"], z_channels=c["latent_channels"], norm_groups=c["norm_num_groups"],
        scale_factor=c["scaling_factor"], shift_factor=c["shift_factor"],
    )


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


def variant_of(layout: Layout, cfg: FluxConfig) -> Variant:
    """Sampling defaults: schnell (no guidance embedding, unshifted schedule, 256 T5 tokens) or dev/Kontext."""
    if layout.kind == "diffusers":
        sched = layout.transformer.parent / "scheduler" / "scheduler_config.json"
        shift = _read_json(sched).get("use_dynamic_shifting", True) if sched.is_file() else cfg.guidance_embed
        name = _read_json(layout.transformer.parent / "model_index.json").get("_class_name", "")
        base = VARIANTS["flux-kontext-dev" if "Kontext" in name else "flux-dev"]
    else:
        shift = cfg.guidance_embed
        base = VARIANTS["flux-kontext-dev" if "kontext" in layout.transformer.name.lower() else "flux-dev"]
    return VARIANTS["flux-schnell"] if not cfg.guidance_embed and not shift else base


# ---- loading ------------------------------------------------------------------------------------------------------

def _strip_prefix(files: TensorFiles, prefixes: tuple[str, ...]) -> dict[str, str]:
    """Checkpoint key -> file key, with a tool prefix removed when every key carries it."""
    keys = files.keys()
    for p in prefixes:
        if keys and all(k.startswith(p) for k in keys):
            return {k[len(p):]: k for k in keys}
    return {k: k for k in keys}


def load_into(module: nn.Module, rules: list[Rule], files: TensorFiles, names: dict[str, str],
              dtype: torch.dtype, device, where: Path) -> nn.Module:
    """Check the key set and every shape, then read, combine, cast and assign each tensor."""
    expected = {s for r in rules for s in r.sources}
    missing, unexpected = sorted(expected - names.keys()), sorted(names.keys() - expected)
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {', '.join(missing[:MAX_LISTED])}" if missing else "",
                 f"{len(unexpected)} unexpected: {', '.join(unexpected[:MAX_LISTED])}" if unexpected else ""]
        raise CheckpointError(f"{where}: keys do not match the model ({'; '.join(p for p in parts if p)})")
    targets = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    state = {}
    with files:
        for rule in rules:
            want = rule.source_shapes(targets[rule.target])
            for src, shape in zip(rule.sources, want, strict=True):
                got = files.shapes[names[src]]
                if got != shape:
                    raise CheckpointError(f"{files.where[names[src]]}: tensor {names[src]!r} has shape "
                                          f"{list(got)}, the model expects {list(shape)}")
            tensors = [files.get(names[s]) for s in rule.sources]
            # a fresh, aligned copy: never a view of the mmapped file (results then do not depend on file offsets)
            state[rule.target] = rule.combine(tensors).to(device=device, dtype=dtype, copy=True).contiguous()
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _meta(factory):
    with torch.device("meta"):
        return factory()


def fingerprint(layout: Layout) -> str:
    """Identity of the transformer and VAE an export is made from (weights sampled, configs in full): exported
    graphs and engines record it, and the runtime refuses engines whose fingerprint differs from the checkpoint's."""
    h = hashlib.sha256()
    for part in (layout.transformer, layout.vae):
        files = sorted(p for p in part.iterdir() if p.suffix in (".safetensors", ".json")) if part.is_dir() else [part]
        for path in files:
            digest_file(h, path)
    return h.hexdigest()[:32]


def _header_config(path: Path, prefixes: tuple[str, ...], parse):
    """A BFL file's config, parsed from its tensor shapes (headers only)."""
    with TensorFiles([path]) as files:
        names = _strip_prefix(files, prefixes)
        return parse({k: files.shapes[v] for k, v in names.items()}, path)


def transformer_config(layout: Layout) -> FluxConfig:
    """The transformer's config from its config.json or its tensor headers, without reading any weights."""
    if layout.kind == "diffusers":
        return diffusers_transformer_config(layout.transformer)
    return _header_config(layout.transformer, BFL_PREFIXES, bfl_transformer_config)


def vae_config(layout: Layout) -> VAEConfig:
    """The autoencoder's config from its config.json or its tensor headers, without reading any weights."""
    if layout.kind == "diffusers":
        return diffusers_vae_config(layout.vae)
    return _header_config(layout.vae, AE_PREFIXES, bfl_vae_config)


def load_transformer(layout: Layout, dtype, device) -> FluxTransformer:
    if layout.kind == "diffusers":
        cfg = diffusers_transformer_config(layout.transformer)
        files = _component_files(layout.transformer, "diffusion_pytorch_model")
        model = _meta(lambda: FluxTransformer(cfg))
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        return load_into(model, diffusers_transformer_rules(shapes), files, {k: k for k in files.keys()},
                         dtype, device, layout.transformer)
    files = TensorFiles([layout.transformer])
    names = _strip_prefix(files, BFL_PREFIXES)
    cfg = bfl_transformer_config({k: files.shapes[v] for k, v in names.items()}, layout.transformer)
    model = _meta(lambda: FluxTransformer(cfg))
    rules = identity_rules({k: tuple(v.shape) for k, v in model.state_dict().items()})
    return load_into(model, rules, files, names, dtype, device, layout.transformer)


def load_vae(layout: Layout, dtype, device) -> AutoEncoder:
    if layout.kind == "diffusers":
        cfg = diffusers_vae_config(layout.vae)
        files = _component_files(layout.vae, "diffusion_pytorch_model")
        model = _meta(lambda: AutoEncoder(cfg))
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        return load_into(model, diffusers_vae_rules(shapes, len(cfg.ch_mult)), files, {k: k for k in files.keys()},
                         dtype, device, layout.vae)
    files = TensorFiles([layout.vae])
    names = _strip_prefix(files, AE_PREFIXES)
    cfg = bfl_vae_config({k: files.shapes[v] for k, v in names.items()}, layout.vae)
    model = _meta(lambda: AutoEncoder(cfg))
    rules = identity_rules({k: tuple(v.shape) for k, v in model.state_dict().items()})
    return load_into(model, rules, files, names, dtype, device, layout.vae)
