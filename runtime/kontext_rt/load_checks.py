"""What Pipeline.from_pretrained checks before it reads any weights: the device, the sequence length, VAE tiling,
and the memory plan of a run (refused when it does not fit)."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import torch

from kontext_rt import image as im
from kontext_rt import memory
from kontext_rt.config import Variant
from kontext_rt.errors import CheckpointError, InputError
from kontext_rt.placement import Placement
from kontext_rt.weights.formats import CheckpointFormat, detect


def check_device(device) -> torch.device:
    """The torch device a pipeline may run on (cpu, or a CUDA GPU that is there), or an InputError."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device {device}: kontext-rt runs on 'cpu' or 'cuda' devices")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} requested but no CUDA GPU is available; use device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"device {device}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 ...)")
    return device


def memory_plan(checkpoint, cfg, dtype, fp8, text_tokens, size, placement, vae_tile=None, steps=28):
    """The plan of a run at size (one context image of that size) with this placement; vae_tile: the tile of a
    pipeline that may tile its VAE; steps: the rows of its modulation table."""
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise InputError(f"plan_size must be (width, height), got {size!r}")
    width, height = size
    im.check_output_size(width, height)
    tokens = (width // 16) * (height // 16)
    encoders = memory.text_encoder_bytes(checkpoint.text_encoders, dtype)
    vae_cfg = checkpoint.vae_config()
    return memory.plan(
        cfg,
        vae_cfg,
        dtype,
        fp8,
        text_tokens,
        tokens,
        tokens,
        width,
        height,
        text_encoders=encoders,
        placement=placement,
        steps=steps,
        vae_tile=vae_tile,
    )


def checkpoint(path, ae, text_encoders, variant):
    """(the detected checkpoint, its transformer config, its variant, the sizes it says it was trained at or None),
    read from headers and configs alone: a bad checkpoint is refused before ~24 GB of weights are read. path may be
    a checkpoint found already (detect), whose ae and text encoders were given to detect."""
    if isinstance(path, CheckpointFormat):
        if ae is not None or text_encoders is not None:
            raise InputError("ae= and text_encoders= belong to detect(...) when path is a found checkpoint")
        found = path
    elif not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path must be a checkpoint folder or file (a str or Path), got {path!r}")
    else:
        found = detect(path, ae=ae, text_encoders=text_encoders)
    if found.text_encoders is None:
        raise CheckpointError(
            f"{path}: no text encoders found beside it: pass text_encoders=FOLDER (a folder "
            "holding text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)"
        )
    cfg = found.transformer_config()
    found.vae_config()
    return found, cfg, found.variant(variant), found.preferred_resolutions()


def tokenizer_limit(text_encoders: Path) -> int | None:
    """The T5 tokenizer's model_max_length (tokenizer_2/tokenizer_config.json), or None where it states none."""
    path = Path(text_encoders) / "tokenizer_2" / "tokenizer_config.json"
    try:
        limit = json.loads(path.read_text()).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return None
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1 else None


def sequence_length(variant: Variant, max_sequence_length, limit: int | None = None) -> int:
    """T5 tokens: the caller's within 1..512, else the variant's default, or the tokenizer's limit where that is
    smaller (a model trained with fewer tokens says so in its tokenizer_config.json)."""
    msl = max_sequence_length
    if msl is None:
        msl = variant.max_sequence_length if limit is None else min(variant.max_sequence_length, limit)
    if not isinstance(msl, int) or isinstance(msl, bool) or not 1 <= msl <= 512:
        raise InputError(f"max_sequence_length must be an integer in 1..512, got {msl!r}")
    return msl


def check_memory(
    backend, checkpoint, cfg, device, dtype, optimize, variant, text_tokens, max_memory, plan_size, placement, tile
):
    """Refuse a load whose memory plan exceeds max_memory= (any device) or a CUDA device's free memory."""
    memory.check_max_memory(max_memory)
    if backend.engines and max_memory is not None:
        raise InputError("max_memory= plans the runtime's own model; backend='tensorrt' runs engines")
    if not backend.engines and (max_memory is not None or device.type == "cuda"):
        fp8 = optimize.fp8 is not None
        steps = variant.steps
        plan = memory_plan(checkpoint, cfg, dtype, fp8, text_tokens, plan_size, placement, tile, steps)
        with_fp8 = None
        if not fp8 and dtype == torch.bfloat16:  # the same request with FP8 linears, planned only if it is refused
            with_fp8 = partial(
                memory_plan, checkpoint, cfg, dtype, True, text_tokens, plan_size, placement, tile, steps
            )

        def allowed(other: Placement) -> bool:  # a placement these speed options can run with
            try:
                other.check(optimize)
            except InputError:
                return False
            return True

        memory.check_budget(plan, device, max_memory, with_fp8, allowed)


def check_vae_tiling(vae_tiling, vae_tile, backend) -> None:
    from kontext_rt.model.vae_tiling import tilings

    if vae_tiling not in ("auto", True, False) or not isinstance(vae_tiling, (str, bool)):
        raise InputError(f"vae_tiling must be True, False or 'auto', got {vae_tiling!r}")
    if isinstance(vae_tile, bool) or not isinstance(vae_tile, int) or vae_tile <= 0 or vae_tile % 32:
        # 32: a multiple of the VAE's 8 px whose quarter overlap is whole latent pixels
        raise InputError(f"vae_tile must be a positive multiple of 32 px, got {vae_tile!r}")
    tilings(vae_tile, 0.25, 8)
    if vae_tiling is True and backend.engines:
        raise InputError("vae_tiling=True tiles the runtime's own VAE; backend='tensorrt' runs the VAE engines")
