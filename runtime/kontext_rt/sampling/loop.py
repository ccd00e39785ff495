"""The one sampling loop (steps of the flow-matching ODE by a solver) over any Denoiser, and what it is given."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from kontext_rt.sampling import solvers


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
    """What the sampling loop runs: `prepare` computes everything invariant for one loop, `velocity` the model.

    prepare(sigmas, cond, x) is a context manager (held for the whole loop: a CUDA-graphed denoiser keeps its graph
    to itself until the loop ends) yielding velocity(i, x) -> v, the model's float32 velocity (B, N, 64) at the
    float32 state x (B, N, 64) and sigmas[i]; v may be a buffer the next call overwrites (a graph's static output),
    so the loop's solver uses it at once (solvers.py: the step is the solver's, the model call the denoiser's).
    The per-step, hoisted and CUDA-graphed loops over the runtime's model and the TensorRT engines are
    implementations (denoisers.py beside this file); `denoise` drives every one of them.
    """

    dtype: torch.dtype  # what the model reads; the state stays float32

    @abstractmethod
    def prepare(
        self, sigmas: torch.Tensor, cond: Conditioning, x: torch.Tensor
    ) -> AbstractContextManager[Callable[[int, torch.Tensor], torch.Tensor]]: ...

    def weights_changed(self) -> None:  # noqa: B027 (an optional hook: most denoisers hold nothing to drop)
        """Called after the model's weights change in place (LoRA fuse/unfuse): drop whatever depends on them."""


@torch.inference_mode()
def denoise(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Conditioning,
    progress: Callable[[int, int], None] | None = None,
    solver: str = "euler",
) -> torch.Tensor:
    """The one sampling loop: the solver's steps over `sigmas` (steps + 1 values ending in 0), state in float32,
    one velocity (one model call) per step.

    Always in inference mode: a graphed denoiser's static buffers are made on its first loop and loaded on every
    later one, and a tensor made in inference mode cannot be updated in place outside it (or the reverse).
    """
    x = x.float()
    steps = len(sigmas) - 1
    solve = solvers.make(solver, sigmas, x.device)
    with denoiser.prepare(sigmas, cond, x) as velocity:
        for i in range(steps):
            x = solve.step(i, x, velocity(i, x))
            if progress is not None:
                progress(i + 1, steps)
    return x
