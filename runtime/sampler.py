"""Flow-matching sampling (REFERENCE.md section 5.1-5.2): the schedules and the one loop, over any Denoiser."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from .errors import InputError

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


@dataclass
class Conditioning:
    """Everything the loop needs besides the state: computed once, before the first step."""

    ctx: torch.Tensor | None  # (B, M, 64) packed context tokens, or None
    txt: torch.Tensor  # (B, T, D_txt)
    pooled: torch.Tensor  # (B, D_vec)
    guidance: torch.Tensor | None  # (B,)
    cos: torch.Tensor  # (T+N+M, head_dim/2)
    sin: torch.Tensor


class Denoiser(ABC):
    """What the sampling loop runs: `prepare` computes everything invariant for one loop, `step` advances the state.

    prepare(sigmas, cond, x) is a context manager (held for the whole loop: a CUDA-graphed denoiser keeps its graph
    to itself until the loop ends) yielding step(i, x) -> x, the i-th Euler step x + (s[i+1] - s[i]) * v of the
    float32 state x (B, N, 64). The per-step, hoisted and CUDA-graphed loops over the runtime's model and the
    TensorRT engines are implementations (runtime/denoisers.py); `denoise` drives every one of them.
    """

    dtype: torch.dtype  # what the model reads; the state stays float32

    @abstractmethod
    def prepare(self, sigmas: torch.Tensor, cond: Conditioning,
                x: torch.Tensor) -> AbstractContextManager[Callable[[int, torch.Tensor], torch.Tensor]]: ...

    def weights_changed(self) -> None:  # noqa: B027 (an optional hook: most denoisers hold nothing to drop)
        """Called after the model's weights change in place (LoRA fuse/unfuse): drop whatever depends on them."""


@torch.inference_mode()
def denoise(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
            progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The one sampling loop: Euler steps over `sigmas` (steps + 1 values ending in 0), state in float32.

    Always in inference mode: a graphed denoiser's static buffers are made on its first loop and loaded on every
    later one, and a tensor made in inference mode cannot be updated in place outside it (or the reverse).
    """
    x = x.float()
    steps = len(sigmas) - 1
    with denoiser.prepare(sigmas, cond, x) as step:
        for i in range(steps):
            x = step(i, x)
            if progress is not None:
                progress(i + 1, steps)
    return x
