"""Tiny random checkpoints in the real formats, built with the reference libraries (diffusers, transformers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from kontext_rt.config import PRESETS, VAE_PRESETS
from kontext_toy.tiny_text import clip_config, t5_config
from kontext_toy.tiny_tokenizers import write_clip_tokenizer, write_t5_tokenizer


def _jitter(module: torch.nn.Module, gen: torch.Generator):
    """Perturb every 1-D parameter (norm scales start at exactly 1), so a swapped mapping cannot go unnoticed."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return module


def diffusers_transformer(guidance: bool, gen: torch.Generator, **overrides):
    from diffusers import FluxTransformer2DModel

    cfg = PRESETS["tiny"]
    kw = dict(
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim,
        guidance_embeds=guidance,
        axes_dims_rope=cfg.axes_dim,
    )
    kw.update(overrides)
    return _jitter(FluxTransformer2DModel(**kw), gen).eval()


def diffusers_vae(gen: torch.Generator, channels=None, groups=None):
    from diffusers import AutoencoderKL

    v = VAE_PRESETS["tiny"]
    chs = channels or [v.ch * m for m in v.ch_mult]
    return _jitter(
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=chs,
            layers_per_block=v.num_res_blocks,
            latent_channels=v.z_channels,
            norm_num_groups=groups or v.norm_groups,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=v.scale_factor,
            shift_factor=v.shift_factor,
        ),
        gen,
    ).eval()


def diffusers_checkpoint(folder: Path, guidance: bool, vae_channels=None, vae_groups=None) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    write_clip_tokenizer(folder / "_tok")
    write_t5_tokenizer(folder / "_tok2")
    tok, tok2 = CLIPTokenizer.from_pretrained(folder / "_tok"), T5TokenizerFast.from_pretrained(folder / "_tok2")
    clip = CLIPTextModel(clip_config(len(tok), tok.eos_token_id, tok.bos_token_id)).eval()
    t5 = T5EncoderModel(t5_config(len(tok2))).eval()
    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0 if guidance else 1.0,
        use_dynamic_shifting=guidance,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxKontextPipeline(
        scheduler=sched,
        vae=diffusers_vae(gen, vae_channels, vae_groups),
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok2,
        transformer=diffusers_transformer(guidance, gen),
    )
    out = folder / "ckpt"
    pipe.save_pretrained(out)
    shutil.rmtree(folder / "_tok")
    shutil.rmtree(folder / "_tok2")
    return out


def bfl_checkpoint(
    folder: Path, diffusers_dir: Path, prefix: str = "", name: str = "flux1-kontext-dev.safetensors", vae: bool = True
) -> dict:
    """BFL single files written from the runtime's own modules (BFL names) loaded from diffusers_dir. The file's
    name says nothing to the loader (the variant comes from shapes or the caller); vae=False writes no
    ae.safetensors (for a diffusers VAE that has no BFL form, e.g. fewer than 32 channels).

    The BFL key set itself is checked independently against diffusers' converter in test_keys.py.
    """
    from kontext_rt.weights.formats import detect

    layout = detect(diffusers_dir)
    model = layout.load_transformer(torch.float32, "cpu")
    folder.mkdir(parents=True, exist_ok=True)
    flux = folder / name
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, flux)
    if vae:
        ae = layout.load_vae(torch.float32, "cpu")
        save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, folder / "ae.safetensors")
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(diffusers_dir / sub, folder / "text" / sub)
    return {"flux": flux, "ae": folder / "ae.safetensors", "text_encoders": folder / "text"}
