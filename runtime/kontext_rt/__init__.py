"""kontext-rt: an inference runtime for FLUX.1 Kontext image editing and FLUX.1 generation.

import kontext_rt as krt
pipe = krt.Pipeline.from_pretrained("path/to/FLUX.1-Kontext-dev", device="cuda", dtype=torch.bfloat16)
out = pipe.edit(image, "make the sky purple")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> the module that defines it. Imported on first use (PEP 562), so that `import kontext_rt` and the CLI's
# --help and --version do not import torch.
_EXPORTS = {
    "Pipeline": "kontext_rt.pipeline",
    "EditSession": "kontext_rt.pipeline",
    "Request": "kontext_rt.pipeline",
    "RunReport": "kontext_rt.pipeline",
    "Optimizations": "kontext_rt.options",
    "KontextError": "kontext_rt.errors",
    "InputError": "kontext_rt.errors",
    "CheckpointError": "kontext_rt.errors",
    "LoRAError": "kontext_rt.errors",
    "EngineError": "kontext_rt.errors",
    "BackendUnavailable": "kontext_rt.errors",
    "PromptTruncated": "kontext_rt.errors",
    "FluxConfig": "kontext_rt.config",
    "VAEConfig": "kontext_rt.config",
    "Variant": "kontext_rt.config",
    "PRESETS": "kontext_rt.config",
    "VAE_PRESETS": "kontext_rt.config",
    "VARIANTS": "kontext_rt.config",
}
__all__ = [
    "Pipeline",
    "EditSession",
    "Request",
    "RunReport",
    "Optimizations",
    "KontextError",
    "InputError",
    "CheckpointError",
    "LoRAError",
    "EngineError",
    "BackendUnavailable",
    "PromptTruncated",
    "FluxConfig",
    "VAEConfig",
    "Variant",
    "PRESETS",
    "VAE_PRESETS",
    "VARIANTS",
]

if TYPE_CHECKING:
    from kontext_rt.config import PRESETS, VAE_PRESETS, VARIANTS, FluxConfig, VAEConfig, Variant
    from kontext_rt.errors import (
        BackendUnavailable,
        CheckpointError,
        EngineError,
        InputError,
        KontextError,
        LoRAError,
        PromptTruncated,
    )
    from kontext_rt.options import Optimizations
    from kontext_rt.pipeline import EditSession, Pipeline, Request, RunReport


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kontext_rt' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
