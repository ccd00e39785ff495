"""kontext-rt: an inference runtime for FLUX.1 Kontext image editing and FLUX.1 generation.

import kontext_rt as krt
pipe = krt.Pipeline.from_pretrained("path/to/FLUX.1-Kontext-dev", device="cuda", dtype=torch.bfloat16)
out = pipe.edit(image, "make the sky purple")
"""

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
