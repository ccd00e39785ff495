"""The safety hook: a callable run on every output image before it is returned (`--safety MODULE:CALLABLE`).

    def check(image: PIL.Image.Image) -> tuple[bool, str]:   # (allowed, reason)

A flagged image is never returned: the response is a 400 `content_policy_violation` naming the reason. A check that
raises, or returns anything but (bool, str), withholds the image too (a 500: the server cannot say it is safe).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from kontext_rt.errors import InputError


class SafetyCheckFailed(RuntimeError):
    """The safety callable raised or returned something other than (allowed: bool, reason: str)."""


def load(spec: str) -> Callable:
    """The callable named by "package.module:name" (a dotted name after the colon reaches an attribute)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(f"--safety {spec!r}: give MODULE:CALLABLE, e.g. mypackage.filters:check")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"--safety {spec!r}: cannot import {module_name} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"--safety {spec!r}: {module_name} has no {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"--safety {spec!r}: {attr} is not callable")
    return obj


def check(fn: Callable, image) -> tuple[bool, str]:
    """(allowed, reason) from the hook, or SafetyCheckFailed."""
    try:
        result = fn(image)
    except Exception as e:
        raise SafetyCheckFailed(f"the safety check raised {type(e).__name__}: {e}") from e
    ok = isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], bool) and isinstance(result[1], str)
    if not ok:
        raise SafetyCheckFailed(f"the safety check must return (allowed: bool, reason: str), got {result!r}")
    return result
