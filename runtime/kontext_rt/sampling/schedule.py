"""The flow-matching schedules (docs/model.md, Sampling): shifted or unshifted sigmas, or explicit ones."""

from __future__ import annotations

import math

import torch

from kontext_rt.errors import InputError

BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


def mu_for(image_seq_len: int) -> float:
    """Shift parameter, linear in the target token count through (256, 0.5) and (4096, 1.15), unclamped."""
    m = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return image_seq_len * m + (BASE_SHIFT - m * BASE_SEQ_LEN)


def schedule(steps: int, image_seq_len: int, shift: bool = True) -> torch.Tensor:
    """steps + 1 sigmas from 1 down to a terminal 0, float32.

    Computed exactly as FluxKontextPipeline + FlowMatchEulerDiscreteScheduler do: linspace(1, 1/steps) in float64,
    cast to float32, then exp(mu) / (exp(mu) + (1/sigma - 1)) in float32 when shifting (mu from target tokens only).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).float()
    if shift:
        e = torch.tensor(math.exp(mu_for(image_seq_len)), dtype=torch.float32)
        sigmas = e / (e + (1.0 / sigmas - 1.0))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def explicit_schedule(sigmas) -> torch.Tensor:
    """A distilled few-step schedule given as sigma values, used as given; a terminal 0 is appended if absent."""
    s = torch.as_tensor(list(sigmas), dtype=torch.float32)
    if s.ndim != 1 or len(s) == 0:
        raise InputError("sigmas must be a non-empty list of numbers")
    if s[-1] != 0:
        s = torch.cat([s, s.new_zeros(1)])
    if len(s) < 2 or not bool(torch.isfinite(s).all()) or s[0] > 1 or not bool((s[1:] < s[:-1]).all()):
        raise InputError(f"sigmas must decrease strictly within (0, 1], got {sigmas!r}")
    return s
