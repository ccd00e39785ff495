"""Backends, chosen once by name: each supplies the op table the model runs with.

An explicitly requested backend that cannot run here fails with the reason; only `auto` falls back.
"""

from __future__ import annotations

from .ops import EAGER_OPS, Ops


class BackendUnavailable(RuntimeError):
    pass


def _eager(device) -> Ops:
    return EAGER_OPS


def _not_in_this_release(name: str):
    def make(device) -> Ops:
        raise BackendUnavailable(f"backend {name!r} is not part of this release yet; use backend='eager'")

    return make


REGISTRY = {"eager": _eager, "triton": _not_in_this_release("triton"), "tensorrt": _not_in_this_release("tensorrt")}
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
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(['auto', *REGISTRY])}")
    return name, REGISTRY[name](device)
