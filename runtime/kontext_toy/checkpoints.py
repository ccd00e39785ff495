"""Small checkpoints in the real diffusers layout, with no downloads.

- small_kontext(): a small Kontext trained on the synthetic shapes task (kontext_toy.shapes) by
  kontext_toy/training/train.py, shipped inside the package; `kontext-rt demo` edits with it.
- demo_checkpoint(): random weights written by the runtime itself, for tests (diffusers loads the same folder and
  computes the same outputs) and as the baseline the trained model must beat.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from kontext_rt.config import PRESETS, VAE_PRESETS
from kontext_rt.errors import CheckpointError
from kontext_rt.model.transformer import FluxTransformer
from kontext_rt.model.vae import AutoEncoder
from kontext_rt.weights.configs import transformer_config_json, vae_config_json
from kontext_rt.weights.mapping import diffusers_transformer_rules, diffusers_vae_rules
from kontext_toy.tiny_text import clip_config, t5_config
from kontext_toy.tiny_tokenizers import write_clip_tokenizer, write_t5_tokenizer

DEMO_VERSION = "1"  # bump when the demo checkpoint's contents change
SMALL_KONTEXT = "small_kontext"  # the shipped model's folder inside this package


def small_kontext() -> Path:
    """The folder of the shipped small Kontext (64x64 px images; its tokenizer says it reads 64 T5 tokens)."""
    from importlib.resources import files

    folder = Path(str(files(__package__) / SMALL_KONTEXT))
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(
            f"the shipped small Kontext is missing from this install ({folder}): reinstall kontext-rt"
        )
    return folder


def _write_json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def _save_mapped(module: torch.nn.Module, rules, path: Path):
    state = module.state_dict()
    out = {}
    for rule in rules:
        for name, t in zip(rule.sources, rule.separate(state[rule.target]), strict=True):
            out[name] = t.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, path)


def write_diffusers_checkpoint(
    folder: Path,
    transformer: FluxTransformer,
    vae: AutoEncoder,
    seed: int = 0,
    text_tokens: int | None = None,
    trained_sizes: list[tuple[int, int]] | None = None,
):
    """Write the runtime's modules (plus tiny text encoders and tokenizers) as a diffusers folder. text_tokens: the
    T5 tokenizer's model_max_length (what the pipeline reads by default when under the variant's), or unset.
    trained_sizes: the (width, height) sizes the model was trained at, recorded in model_index.json (the runtime
    snaps context images to them and generates at them by default), or unset (FLUX.1's)."""

    with torch.random.fork_rng(devices=[]):  # seeded text encoders without touching the caller's global RNG
        torch.manual_seed(seed)
        _write_diffusers_checkpoint(folder, transformer, vae, text_tokens)
    if trained_sizes is not None:
        index = json.loads((folder / "model_index.json").read_text())
        index["_kontext_rt"] = {"preferred_resolutions": [list(size) for size in trained_sizes]}
        _write_json(folder / "model_index.json", index)


def _write_diffusers_checkpoint(folder: Path, transformer: FluxTransformer, vae: AutoEncoder, text_tokens=None):
    from transformers import CLIPTextModel, T5EncoderModel

    tshapes = {k: tuple(v.shape) for k, v in transformer.state_dict().items()}
    weights = "diffusion_pytorch_model.safetensors"
    _save_mapped(transformer, diffusers_transformer_rules(tshapes), folder / "transformer" / weights)
    _write_json(folder / "transformer" / "config.json", transformer_config_json(transformer.cfg))
    vshapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    _save_mapped(vae, diffusers_vae_rules(vshapes, len(vae.cfg.ch_mult)), folder / "vae" / weights)
    _write_json(folder / "vae" / "config.json", vae_config_json(vae.cfg))
    tok = write_clip_tokenizer(folder / "tokenizer")
    tok2 = write_t5_tokenizer(folder / "tokenizer_2", text_tokens)
    CLIPTextModel(clip_config(len(tok), tok.eos_token_id, tok.bos_token_id)).save_pretrained(folder / "text_encoder")
    T5EncoderModel(t5_config(len(tok2))).save_pretrained(folder / "text_encoder_2")
    guided = transformer.cfg.guidance_embed
    _write_json(
        folder / "scheduler" / "scheduler_config.json",
        {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": 1000,
            "shift": 3.0 if guided else 1.0,
            "use_dynamic_shifting": guided,
            "base_shift": 0.5,
            "max_shift": 1.15,
            "base_image_seq_len": 256,
            "max_image_seq_len": 4096,
        },
    )
    _write_json(
        folder / "model_index.json",
        {
            "_class_name": "FluxKontextPipeline",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
        },
    )


def demo_checkpoint(cache_dir: Path, seed: int = 0) -> Path:
    """The demo checkpoint in cache_dir, written once (built in a temporary folder, then renamed into place)."""
    target = Path(cache_dir) / f"demo-checkpoint-v{DEMO_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".demo-"))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            modules = FluxTransformer(PRESETS["tiny"]), AutoEncoder(VAE_PRESETS["tiny"])
        write_diffusers_checkpoint(tmp, *modules, seed)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
