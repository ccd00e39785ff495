"""Backends: each builds what it runs (a Denoiser and a VAE) and owns its checks; only `auto` falls back.

    backend = resolve(name, device)   # refuses, with the reason, a backend that cannot run here
    accepted = checked(backend, request, auto=name == "auto")   # before any weights are read
    loaded = accepted.backend.load(accepted)   # Loaded(denoiser, vae, transformer, loras)

`auto` may accept the request with another backend than the one resolved (the next in its order that accepts it):
load with accepted.backend.

The eager and triton backends run the runtime's own model with their op table (the reference ops, or the Triton
kernels); the tensorrt backend runs engines built by `kontext-rt export` and reads no transformer or VAE weights.
Nothing outside the backends compares backend names.

    base            LoadRequest, Accepted, Loaded, Backend: what every backend shares
    torch_backends  Eager, Triton (the runtime's own model, with an op table); prepare: LoRAs, FP8, compile
    attention       the triton backend's attention (sdpa, fa3, fa3-fp8): FA3's probe, chosen at check time
    tensorrt        TensorRT (the engines) and the engine runner; manifest, graph_io: the artifacts' contract
    registry        resolve, checked: backends by name, and auto's order
"""

from kontext_rt.backends.base import Accepted, Backend, Loaded, LoadRequest
from kontext_rt.backends.registry import REGISTRY, checked, resolve
from kontext_rt.backends.tensorrt import TensorRT
from kontext_rt.backends.torch_backends import Eager, TorchBackend, Triton

__all__ = [
    "Accepted",
    "REGISTRY",
    "Backend",
    "Eager",
    "LoadRequest",
    "Loaded",
    "TensorRT",
    "TorchBackend",
    "Triton",
    "checked",
    "resolve",
]
