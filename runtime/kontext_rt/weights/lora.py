"""LoRA files in the diffusers/PEFT, kohya and BFL/ComfyUI formats, fused into the weights (docs/python-api.md, LoRA).

Every format is read into the same form: per runtime linear (BFL names), a row range, A [r, in], B [rows, r], an
optional B bias, and the scale alpha / r. Fusing adds  strength * scale * (B @ A)  (in float32, then cast) to those
rows: a diffusers `to_k` LoRA lands on rows H:2H of the fused qkv weight, `proj_mlp` on rows 3H: of linear1, and a
LoRA of diffusers' `norm_out.linear` gets the halves of B swapped (its shift|scale order is BFL's scale|shift).
Unfusing restores the exact original tensors, kept aside (on the CPU) the first time a LoRA touches them.

Key spellings accepted, after an optional prefix (transformer., diffusion_model., model.diffusion_model.,
base_model.model., lora_unet_, lora_transformer_, lycoris_): BFL or diffusers module names, with dots or (kohya,
OneTrainer, LyCORIS) underscores; weights as .lora_A/.lora_B or .lora_down/.lora_up, with an optional .alpha.
Alpha otherwise comes from the file's `lora_adapter_metadata` (PEFT's LoraConfig), or equals the rank (scale 1).
Any key that names no module of this model, or a tensor of a kind not handled (DoRA scales, full .diff deltas,
text-encoder LoRAs), is an error that lists the keys.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kontext_rt.errors import CheckpointError, LoRAError
from kontext_rt.weights.mapping import BLOCK_GROUPS, GLOBAL_NAMES, SWAPPED, fused_split
from kontext_rt.weights.safetensors_io import TensorFiles

PREFIXES = (
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    "transformer.",
    "lora_unet_",
    "lora_transformer_",
    "lycoris_",
)
DOWN = (".lora_A.weight", ".lora_down.weight")
UP = (".lora_B.weight", ".lora_up.weight")
UP_BIAS = (".lora_B.bias", ".lora_up.bias")
ALPHA = ".alpha"
MAX_LISTED = 12


@dataclass(frozen=True)
class Target:
    param: str  # the runtime's weight name, e.g. "double_blocks.0.img_attn.qkv"  (.weight / .bias appended)
    rows: tuple[int, int]  # the row range of that weight the LoRA's B covers
    swap: bool = False  # diffusers norm_out.linear: B's two row halves in the other order


@dataclass(frozen=True)
class Delta:
    target: Target
    down: torch.Tensor  # A (r, in)
    up: torch.Tensor  # B (rows, r)
    up_bias: torch.Tensor | None
    scale: float  # alpha / r (or alpha / sqrt(r) with rsLoRA)
    source: str  # the module key in the file, for messages


def module_names(model: nn.Module) -> dict[str, Target]:
    """Every spelling of every LoRA-able linear of the model -> where it lands in the runtime's weights."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out: dict[str, Target] = {n: Target(n, (0, m.out_features)) for n, m in linears.items()}
    for bfl, diff in GLOBAL_NAMES.items():
        if bfl in linears:
            out[diff] = Target(bfl, (0, linears[bfl].out_features), swap=bfl == SWAPPED)
    for group, prefix, table in BLOCK_GROUPS:
        for i in range(len(getattr(model, group))):
            for bfl, diff in table.items():
                name = f"{group}.{i}.{bfl}"
                if name not in linears:
                    continue  # the QK norm scales: no LoRA on them
                if isinstance(diff, str):
                    out[f"{prefix}.{i}.{diff}"] = Target(name, (0, linears[name].out_features))
                    continue
                start = 0  # fused qkv / linear1: the same row split the checkpoint loader uses
                for part, size in zip(
                    diff, fused_split(diff, linears[name].out_features, model.cfg.hidden_size), strict=True
                ):
                    out[f"{prefix}.{i}.{part}"] = Target(name, (start, start + size))
                    start += size
    out.update({k.replace(".", "_"): v for k, v in list(out.items())})  # kohya / OneTrainer / LyCORIS spelling
    return out


def _split_key(key: str) -> tuple[str, str] | None:
    """'<module>.lora_A.weight' -> ('<module>', '.lora_A.weight'), prefix stripped; None if no known suffix."""
    for suffix in DOWN + UP + UP_BIAS + (ALPHA,):
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            for p in PREFIXES:
                if module.startswith(p):
                    module = module[len(p) :]
                    break
            return module, suffix
    return None


def _adapter_config(meta: dict[str, str], where: Path) -> dict:
    raw = meta.get("lora_adapter_metadata")
    if raw is None:
        return {}
    try:
        conf = json.loads(raw)
    except ValueError:
        raise LoRAError(f"{where}: unreadable lora_adapter_metadata in the file header") from None
    return {k.removeprefix("transformer."): v for k, v in conf.items()} if isinstance(conf, dict) else {}


def _alpha(module: str, rank: int, tensors: dict, alpha_key: str | None, conf: dict) -> float:
    """alpha / r, from the .alpha tensor, else PEFT's config (alpha_pattern, lora_alpha), else 1."""
    if alpha_key is not None:
        alpha = float(tensors[alpha_key].float().reshape(-1)[0])
    else:
        alpha = rank
        if "lora_alpha" in conf:
            alpha = float(conf["lora_alpha"])
        for pattern, value in (conf.get("alpha_pattern") or {}).items():
            if module == pattern or module.endswith("." + pattern):
                alpha = float(value)
    return alpha / (math.sqrt(rank) if conf.get("use_rslora") else rank)


def read(path, model: nn.Module) -> list[Delta]:
    """The deltas of a LoRA file for this model; any key that cannot be applied is an error listing them."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoRAError(f"{path}: LoRAs are read from .safetensors files only (pickle files never are)")
    try:
        files = TensorFiles([path])
    except CheckpointError as e:
        raise LoRAError(str(e)) from None
    with files:
        tensors = {k: files.get(k) for k in files.keys()}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        conf = _adapter_config(dict(f.metadata() or {}), path)
    names = module_names(model)
    groups: dict[str, dict[str, str]] = {}
    unknown = []
    for key in sorted(tensors):
        split = _split_key(key)
        if split is None or split[0] not in names:
            unknown.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = key
    if unknown:
        more = f" (and {len(unknown) - MAX_LISTED} more)" if len(unknown) > MAX_LISTED else ""
        raise LoRAError(
            f"{path}: {len(unknown)} keys name nothing this model can fuse: {', '.join(unknown[:MAX_LISTED])}{more}"
        )
    if not groups:
        raise LoRAError(f"{path}: no LoRA tensors in the file")
    return [_delta(path, module, keys, tensors, names[module], conf) for module, keys in groups.items()]


def _delta(path, module, keys, tensors, target: Target, conf) -> Delta:
    down_key = next((keys[s] for s in DOWN if s in keys), None)
    up_key = next((keys[s] for s in UP if s in keys), None)
    if down_key is None or up_key is None:
        raise LoRAError(f"{path}: {module} has {'no A (down)' if down_key is None else 'no B (up)'} weight")
    down, up = tensors[down_key].float(), tensors[up_key].float()
    rows = target.rows[1] - target.rows[0]
    if down.ndim != 2 or up.ndim != 2 or up.shape != (rows, down.shape[0]):
        raise LoRAError(
            f"{path}: {module}: A {list(down.shape)} and B {list(up.shape)} do not make a "
            f"[{rows}, in] update of {target.param}"
        )
    bias_key = next((keys[s] for s in UP_BIAS if s in keys), None)
    bias = None if bias_key is None else tensors[bias_key].float()
    if bias is not None and bias.shape != (rows,):
        raise LoRAError(f"{path}: {module}: B bias {list(bias.shape)}, expected [{rows}]")
    if target.swap:  # diffusers (scale | shift) rows onto BFL (shift | scale)
        up = torch.cat(up.chunk(2, 0)[::-1])
        bias = None if bias is None else torch.cat(bias.chunk(2, 0)[::-1])
    scale = _alpha(module, down.shape[0], tensors, keys.get(ALPHA), conf)
    return Delta(target, down, up, bias, scale, module)


class LoRAStack:
    """The LoRAs fused into one model, in order; unloading restores the kept originals and refuses the rest."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.loaded: list[tuple[str, list[Delta], float]] = []
        self._originals: dict[str, torch.Tensor] = {}  # param name -> original tensor, on the CPU

    def names(self) -> list[str]:
        return [name for name, _, _ in self.loaded]

    def load(self, path, strength: float = 1.0, name: str | None = None) -> str:
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
            raise LoRAError(f"strength must be a finite number, got {strength!r}")
        name = Path(path).stem if name is None else name
        if name in self.names():
            raise LoRAError(f"a LoRA named {name!r} is already loaded; unload it first or pass another name")
        deltas = read(path, self.model)  # every check before the first weight changes
        params = dict(self.model.named_parameters())
        for d in deltas:
            if d.up_bias is not None and f"{d.target.param}.bias" not in params:
                raise LoRAError(f"{path}: {d.source} has a B bias but {d.target.param} has no bias")
        self._fuse(deltas, float(strength))
        self.loaded.append((name, deltas, float(strength)))
        return name

    def unload(self, name: str | None = None) -> None:
        """Remove one LoRA (the others are fused again from the originals) or, with no name, all of them."""
        if name is not None and name not in self.names():
            raise LoRAError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(self.names()) or 'none'})")
        keep = [] if name is None else [entry for entry in self.loaded if entry[0] != name]
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for pname, original in self._originals.items():
                params[pname].copy_(original)
        self._originals.clear()
        self.loaded = []
        for entry in keep:
            self._fuse(entry[1], entry[2])
            self.loaded.append(entry)

    def forget_originals(self) -> None:
        """Drop the kept originals (the FP8 path quantizes the fused weights, which can no longer be unfused):
        up to a full copy of the weights in host memory, otherwise held for nothing."""
        self._originals.clear()

    @torch.no_grad()
    def _fuse(self, deltas: list[Delta], strength: float) -> None:
        params = dict(self.model.named_parameters())
        for d in deltas:
            start, end = d.target.rows
            for pname, update in ((f"{d.target.param}.weight", d.up @ d.down), (f"{d.target.param}.bias", d.up_bias)):
                if update is None:
                    continue
                p = params[pname]
                if pname not in self._originals:
                    self._originals[pname] = p.detach().to("cpu", copy=True)
                rows = p[start:end]
                rows.copy_((rows.float() + (strength * d.scale) * update.to(p.device)).to(p.dtype))
