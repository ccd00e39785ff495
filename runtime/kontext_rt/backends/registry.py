"""Backends by name: `resolve` picks one for a device (only `auto` falls back, in AUTO_ORDER), `checked` runs its
check before any weights are read (for `auto`, moving on to the next backend that accepts the request).

Nothing outside the backends compares backend names.
"""

from __future__ import annotations

import warnings
from types import MappingProxyType

import torch

from kontext_rt.backends.base import Accepted, Backend, LoadRequest
from kontext_rt.backends.tensorrt import TensorRT
from kontext_rt.backends.torch_backends import Eager, Triton
from kontext_rt.errors import BackendUnavailable, InputError

REGISTRY: dict[str, type[Backend]] = {"eager": Eager, "triton": Triton, "tensorrt": TensorRT}
# What auto tries, by device type. On CUDA the triton backend first: on an H200 its step took 336 ms against
# eager's 411 and diffusers' 369 (benchmarks/results/h200-2026-11-28-8fc0047). Elsewhere the reference path: on a
# CPU the kernels run only in the Triton interpreter, which is for tests.
AUTO_ORDER = MappingProxyType({"cuda": ("triton", "eager")})
AUTO_DEFAULT = ("eager",)


def _auto_order(device: torch.device) -> tuple[str, ...]:
    return AUTO_ORDER.get(device.type, AUTO_DEFAULT)


def resolve(name: str, device, engines=None) -> Backend:
    """The backend called `name`, ready for `device`. `auto` runs the engines when given a folder of them, else
    takes the first backend in AUTO_ORDER for the device's type that can run there."""
    device = torch.device(device)
    if name == "auto" and engines is not None:
        return TensorRT(device)
    if name == "auto":
        return _first_of(_auto_order(device), device, [], None, f"runs on {device}")[0]
    if name not in REGISTRY:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(['auto', *REGISTRY])}")
    return REGISTRY[name](device)


def checked(backend: Backend, request: LoadRequest, auto: bool) -> Accepted:
    """backend.check(request): what load takes, with the backend to load with (its `backend`). For `auto`, a
    refusal (e.g. a head dim the kernels lack) moves on to the next backend of the order that can run here and
    accepts the request; each reason is kept in `passed_over`, and on a GPU, where that costs speed, given in a
    RuntimeWarning."""
    try:
        accepted = backend.check(request)
    except BackendUnavailable as err:
        if not auto:
            raise
        order = _auto_order(backend.device)
        rest = order[order.index(backend.name) + 1 :] if backend.name in order else ()
        reasons = [*backend.passed_over, str(err)]
        backend, accepted = _first_of(rest, backend.device, reasons, request, "runs this model here")
    if auto and backend.passed_over and backend.device.type == "cuda":
        warnings.warn(
            f"backend 'auto' runs {backend.name!r} on this GPU, not a faster one: {'; '.join(backend.passed_over)}",
            RuntimeWarning,
            stacklevel=3,
        )
    return accepted


def _first_of(
    candidates, device, reasons: list[str], request: LoadRequest | None, what: str
) -> tuple[Backend, Accepted | None]:
    """The first candidate that can run on `device` (and accepts `request`, if given: then with what its check
    accepted, else None), with the reasons for every one passed over, these included, in its `passed_over`."""
    for candidate in candidates:
        try:
            backend = REGISTRY[candidate](device)
            accepted = None if request is None else backend.check(request)
        except BackendUnavailable as e:
            reasons.append(str(e))
            continue
        backend.passed_over = tuple(reasons)
        return backend, accepted
    raise BackendUnavailable(f"backend 'auto' found none that {what}: {'; '.join(reasons)}")
