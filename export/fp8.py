"""FP8 (e4m3) post-training quantization of the transformer's linear layers with NVIDIA ModelOpt.

Per-tensor static scales for weights and activations (ModelOpt's FP8 default: max calibration), calibrated by
running real edits through the pipeline, so the activations seen are those of every sampling step. The graph is then
exported with TensorRT's FP8 Q/DQ nodes (trt::TRT_FP8QuantizeLinear / TRT_FP8DequantizeLinear), which a strongly
typed TensorRT build turns into FP8 GEMMs.

Calibration state: every quantizer's amax, in a safetensors file with the ModelOpt version, the recipe's digest and
the checkpoint fingerprint in its header. `mto.save` would pickle the whole model (24 GB of weights besides the few
kilobytes that matter, and pickle is never loaded here); restoring re-applies the same recipe to the loaded model
and sets the saved amax values, which reproduces the calibrated model exactly (tests/test_fp8_export.py).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kontext_rt.errors import CheckpointError
from kontext_rt.model.fp8_linear import CALIBRATION_FORMAT

# Module-name patterns kept in the model dtype, and why. The embedders and the final layer follow ModelOpt's own
# FLUX recipe (examples/diffusers/quantization, filter_func_flux_dev: x_embedder, context_embedder,
# time_text_embed, norm_out, proj_out); the modulation (adaLN) linears follow NVIDIA's FLUX TensorRT recipes, which
# leave the blocks' norm1/norm1_context/norm linears unquantized. Norms themselves (LayerNorm, QK RMSNorm) are not
# linear layers and never get quantizers.
HIGH_PRECISION: dict[str, str] = {
    "img_in": "embedder: the 64-wide latent input, tiny and first in the chain",
    "txt_in": "embedder: T5 features with outliers FP8 clips",
    "time_in.*": "embedder: one vector per image, nothing to gain, and its error moves every block's modulation",
    "vector_in.*": "embedder: as time_in",
    "guidance_in.*": "embedder: as time_in",
    "*_mod.lin": "modulation (adaLN): shift/scale/gate for every token come from it; one row per image",
    "*.modulation.lin": "modulation (adaLN) of the single blocks: as above",
    "final_layer.*": "final layer: its output is the velocity itself, and its adaLN is modulation",
}


def recipe() -> dict:
    """ModelOpt's FP8 default with the HIGH_PRECISION modules disabled."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    for pattern in HIGH_PRECISION:
        cfg["quant_cfg"].append({"quantizer_name": f"{pattern}.*quantizer", "enable": False})
    return cfg


def recipe_digest() -> str:
    body = {"modelopt_fp8_default": _jsonable(recipe()), "high_precision": sorted(HIGH_PRECISION)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x if isinstance(x, (int, float, str, bool, type(None))) else str(x)


def quantize(model: nn.Module, forward_loop: Callable[[nn.Module], None] | None) -> nn.Module:
    """Insert FP8 quantizers into model (in place) and calibrate them with forward_loop(model)."""
    import modelopt.torch.quantization as mtq

    return mtq.quantize(model, recipe(), forward_loop)


def is_high_precision(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in HIGH_PRECISION)


def linear_layers(model: nn.Module) -> dict[str, bool]:
    """{linear module name: quantized to FP8?}: both its input and weight quantizers enabled."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            wq, iq = getattr(m, "weight_quantizer", None), getattr(m, "input_quantizer", None)
            out[name] = bool(wq is not None and iq is not None and wq.is_enabled and iq.is_enabled)
    return out


# ---- calibration state ------------------------------------------------------------------------------------------


def _amax_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items() if k.endswith("._amax")}


def save_calibration(model: nn.Module, path: Path, fingerprint: str) -> Path:
    """Every enabled quantizer's amax, with what it was made from in the header. Written atomically."""
    from modelopt import __version__ as modelopt_version
    from safetensors.torch import save_file

    state = _amax_state(model)
    if not state:
        raise ValueError("the model has no calibrated quantizers to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    save_file(
        state,
        str(tmp),
        metadata={
            "modelopt": modelopt_version,
            "recipe": recipe_digest(),
            "checkpoint": fingerprint,
            "format": CALIBRATION_FORMAT,
        },
    )
    tmp.replace(path)
    return path


def calibration_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def restore_calibration(model: nn.Module, path: Path, fingerprint: str) -> nn.Module:
    """Re-apply the recipe (no calibration pass) and set the saved amax values; refuse a file made for another
    checkpoint or recipe, or one whose quantizers do not match the model's."""
    from safetensors.torch import load_file

    meta = calibration_metadata(path)
    if meta.get("checkpoint") != fingerprint:
        raise CheckpointError(
            f"{path}: calibrated on another checkpoint ({meta.get('checkpoint')}, this one is "
            f"{fingerprint}): calibrate again"
        )
    if meta.get("recipe") != recipe_digest():
        raise CheckpointError(f"{path}: made with another FP8 recipe ({meta.get('recipe')}): calibrate again")
    saved = load_file(str(path))
    quantize(model, None)
    expected = {
        f"{name}.{q}._amax"
        for name, fp8 in linear_layers(model).items()
        if fp8
        for q in ("input_quantizer", "weight_quantizer")
    }
    if missing := sorted(expected - saved.keys()):
        raise CheckpointError(f"{path}: no amax for {len(missing)} quantizers, e.g. {missing[:3]}")
    for key, amax in saved.items():
        quantizer = key.removesuffix("._amax")
        try:
            model.get_submodule(quantizer).amax = amax
        except AttributeError:
            raise CheckpointError(f"{path}: {quantizer} is not a quantizer of this model") from None
    return model


# ---- calibration data -------------------------------------------------------------------------------------------

DEFAULT_PROMPTS = (
    "make the sky purple at sunset",
    "turn the photo into a watercolor painting",
    "add a red scarf to the person",
    "remove the text from the sign",
    "change the season to winter with snow on the ground",
    "make it look like a vintage film photograph",
    "replace the background with a beach",
    "give the cat a small wizard hat",
)


@dataclass(frozen=True)
class CalibrationSet:
    """What calibration runs through the real pipeline: each prompt edits one image (cycled), `steps` steps each.

    images: paths or PIL images; none given: each image is first generated from its prompt with the same model, so
    the context tokens come from the model's own distribution and nothing has to be shipped.
    """

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    images: tuple = field(default_factory=tuple)
    steps: int = 8
    size: int = 1024  # generated context images: size x size
    auto_resize: bool = True  # snap context images to a preferred Kontext resolution, as edits do by default

    def describe(self) -> dict:
        """JSON-able and stable: paths as given, in-memory images by a digest of their pixels."""
        images = [
            str(i) if isinstance(i, (str, Path)) else hashlib.sha256(i.tobytes()).hexdigest()[:16] for i in self.images
        ]
        return {
            "prompts": list(self.prompts),
            "images": images or "generated",
            "steps": self.steps,
            "size": self.size,
            "auto_resize": self.auto_resize,
        }


def calibration_loop(pipe, data: CalibrationSet, progress: Callable[[str], None] | None = None):
    """forward_loop for quantize(): pipeline edits whose transformer is the model being calibrated."""
    if not data.prompts:
        raise ValueError("calibration needs at least one prompt")

    def loop(model):
        for i, prompt in enumerate(data.prompts):
            if data.images:
                image = data.images[i % len(data.images)]
            else:
                image = pipe.generate(prompt, width=data.size, height=data.size, steps=data.steps, seed=i)
            pipe.edit(image, prompt, steps=data.steps, seed=i, output="latent", auto_resize=data.auto_resize)
            if progress is not None:
                progress(f"calibration {i + 1}/{len(data.prompts)}")

    return loop
