"""Backends, chosen once by name: each supplies the op table the model runs with.

An explicitly requested backend that cannot run here fails with the reason; only `auto` falls back.
"""

from __future__ import annotations

import torch

from .errors import BackendUnavailable, InputError
from .ops import EAGER_OPS, Ops


def _eager(device) -> Ops:
    return EAGER_OPS


def _triton(device) -> Ops:
    try:
        from .kernels import ops as kernels
    except ImportError as err:
        raise BackendUnavailable(f"backend 'triton' needs the triton package ({err}); install triton or use "
                                 "backend='eager'") from err
    device = torch.device(device)
    if device.type == "cuda":
        if kernels.interpreted():
            raise BackendUnavailable("backend 'triton' was asked for on a CUDA device, but its kernels were "
                                     "compiled for the Triton interpreter (TRITON_INTERPRET=1): unset it, or use "
                                     "backend='eager'")
        if not torch.cuda.is_available():
            raise BackendUnavailable("backend 'triton' needs a CUDA GPU and none is visible; use backend='eager'")
        if torch.cuda.get_device_capability(device) < (8, 0):
            name = torch.cuda.get_device_name(device)
            raise BackendUnavailable(f"backend 'triton' needs compute capability 8.0 or newer (bf16), {name} has "
                                     f"{torch.cuda.get_device_capability(device)}; use backend='eager'")
    elif device.type == "cpu":
        if not kernels.interpreted():
            raise BackendUnavailable("backend 'triton' needs a CUDA GPU; on the CPU its kernels run only under "
                                     "the Triton interpreter (TRITON_INTERPRET=1, for tests); use backend='eager'")
    else:
        raise BackendUnavailable(f"backend 'triton' runs on CUDA devices, not {device.type}; use backend='eager'")
    return Ops(attention=kernels.attention, modulate=kernels.modulate, gated_residual=kernels.gated_residual,
               row_linear=kernels.row_linear_op, quantize_rows=kernels.quantize_rows, head_dims=kernels.HEAD_DIMS)


def _tensorrt(device) -> Ops:
    """Engines replace the whole transformer and VAE; the op table is unused. Needs a GPU and TensorRT."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise BackendUnavailable(f"backend 'tensorrt' needs a CUDA GPU (device is {device}); use backend='eager'")
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:  # PyPI's tensorrt stubs fail here too, on a missing libnvinfer
        raise BackendUnavailable(f"backend 'tensorrt' needs TensorRT, which is not importable here ({err}); "
                                 "install it from NVIDIA's package index, or use backend='eager'") from err
    return EAGER_OPS


REGISTRY = {"eager": _eager, "triton": _triton, "tensorrt": _tensorrt}
# auto stays on the reference path until the triton kernels have been timed on a GPU (benchmarks/kernels_gpu.py)
AUTO_ORDER = ("eager",)


def resolve(name: str, device) -> tuple[str, Ops]:
    """(resolved name, op table) for a backend name; `auto` takes the first that can run on `device`."""
    if name == "auto":
        for candidate in AUTO_ORDER:
            try:
                return candidate, REGISTRY[candidate](device)
            except BackendUnavailable:
                continue
    if name not in REGISTRY:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(['auto', *REGISTRY])}")
    return name, REGISTRY[name](device)
