"""What every backend shares: the request it loads from (LoadRequest), what it builds (Loaded), and the Backend
interface: `check` refuses what the backend cannot run before any weights are read and returns what it accepted
(Accepted), which `load` builds from. What a check reads for the load travels in the Accepted, never on the
backend."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kontext_rt.backends.manifest import Precision
from kontext_rt.config import FluxConfig
from kontext_rt.options import Optimizations
from kontext_rt.parallel import Parallel
from kontext_rt.placement import Placement
from kontext_rt.sampling.loop import Denoiser
from kontext_rt.weights.formats import CheckpointFormat
from kontext_rt.weights.lora import LoRAStack


@dataclass(frozen=True)
class LoadRequest:
    """Everything a backend needs to build a pipeline's model (Pipeline.from_pretrained fills it in)."""

    checkpoint: CheckpointFormat  # the detected checkpoint
    path: Path  # the checkpoint as the user named it: messages and export commands name it
    cfg: FluxConfig
    dtype: torch.dtype
    optimize: Optimizations
    loras: tuple = ()  # LoRA files, each a path or (path, strength), fused at load
    engines: Path | None = None  # tensorrt: the folder `kontext-rt export --out` wrote
    engine_precision: Precision | None = None
    placement: Placement = Placement()
    parallel: Parallel | None = None  # sequence parallelism over its (resolved) process group; None: one process


@dataclass
class Loaded:
    """What a backend built: the loop's denoiser, the VAE, and (for the runtime's own model) the transformer and
    its LoRA stack; engines have neither (None)."""

    denoiser: Denoiser
    vae: object
    transformer: torch.nn.Module | None = None
    loras: LoRAStack | None = None


@dataclass(frozen=True)
class Accepted:
    """A request a backend's check accepted, with what the check read that the load uses."""

    backend: Backend
    request: LoadRequest
    input_amax: dict[str, torch.Tensor] | None = None  # static FP8: the calibration's input amax per layer name
    attention: object = None  # triton: the attention its probe chose (backends.attention.AttentionChoice)


class Backend:
    """One backend on one device: `check` a request before any weights are read, then `load` what it accepted."""

    name: str
    passed_over: tuple[str, ...] = ()  # auto: why each backend before this one could not run (resolve, checked)
    engines = False  # True: runs prebuilt engines (needs engines=DIR, takes no runtime speed options or LoRAs)

    def __init__(self, device: torch.device):
        self.device = device

    def check(self, req: LoadRequest) -> Accepted:
        """Refuse what this backend cannot run, naming the fix (before any weights are read)."""
        return Accepted(self, req)

    def load(self, accepted: Accepted) -> Loaded:
        """Build what this backend runs from a request its check accepted."""
        raise NotImplementedError
