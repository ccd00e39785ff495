"""kontext-rt: an inference runtime for FLUX.1 Kontext image editing and FLUX.1 generation.

import kontext_rt as krt
pipe = krt.Pipeline.from_pretrained("path/to/FLUX.1-Kontext-dev", device="cuda", dtype=torch.bfloat16)
out = pipe.edit(image, "make the sky purple")
"""

from __future__ import annotations

import importlib

# name -> the module that defines it. Imported on first use (PEP 562), so that `import kontext_rt` and the CLI's
# --help and --version do not import torch.
_EXPORTS = {
    "Pipeline": "kontext_rt.pipeline",
    "EditSession": "kontext_rt.pipeline",
    "Request": "kontext_rt.pipeline",
    "RunReport": "kontext_rt.pipeline",
    "Optimizations": "kontext_rt.options",
    "Parallel": "kontext_rt.parallel",
    "LoadSpec": "kontext_rt.load_spec",
    "CheckedLoad": "kontext_rt.load_spec",
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
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kontext_rt' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
