"""Step caching: the first-block residual cache (FBCache, cache-dit's DBCache with one front block and none behind).

At every step the model's input projections and first double block run (FluxTransformer.first_block). The change
of that block's residual on the target tokens, r = out - in of double block 0 over the N target tokens, against
r_full, the one of the last fully computed step, is the relative L1

    delta = mean |r - r_full| / mean |r_full|        (per batch row; the batch decides on its largest delta)

Under the threshold the step skips every later block: the last hidden state is the first block's output plus the
cached residual of the remaining blocks, rest = h_full - out_full (the last full step's last hidden state of the
target tokens minus its first-block output), and only the final layer runs. At or over it, every block runs and
r_full and rest are refreshed. The first step always runs in full (nothing is cached yet), so a threshold of 0
never skips; a huge one runs step 0 alone in full.

The decision is per batch: every row of a batch skips a step or none does (one transformer call for all of them),
on the largest delta of its rows, so a request batched with others skips no more steps than it would alone.

Each step's decision reads delta on the host (one `.item()`, a device sync per step): the next step's kernels are
not queued until the current step's first block has finished. On a GPU that costs the launch overlap of one step
(tens of microseconds on FLUX sizes, against a full step's hundreds of milliseconds); it is also why the CUDA-graphed
denoiser and the TensorRT engines take no step cache (a graph replays a fixed sequence of kernels, the engine is one
call of the whole transformer).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from kontext_rt.errors import InputError
from kontext_rt.model.transformer import FirstBlock
from kontext_rt.sampling.denoisers import Hoisted, PerStep, _timesteps
from kontext_rt.sampling.loop import Conditioning, Denoiser


def cacheable(denoiser: Denoiser) -> tuple:
    """(model, ops, hoist) of a denoiser over the runtime's model, or an InputError saying why it takes no cache."""
    if type(denoiser) is Hoisted:
        return denoiser.model, denoiser.ops, True
    if type(denoiser) is PerStep and denoiser.model is not None:
        return denoiser.model, denoiser.ops, False
    raise InputError(
        f"step_cache needs the eager or triton backend without CUDA graphs and with the transformer resident (this "
        f"pipeline runs {type(denoiser).__name__}): each step's skip decision is read on the host, and a CUDA graph "
        "or a TensorRT engine runs the whole transformer as one fixed call (a streamed placement, one fixed pass "
        "over the blocks)"
    )


def relative_l1(now: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """mean |now - last| / mean |last| per batch row, in float32: (B, N, C) x 2 -> (B,)."""
    now, last = now.float(), last.float()
    return (now - last).abs().mean((1, 2)) / last.abs().mean((1, 2))


class FirstBlockCache(Denoiser):
    """A loop over the runtime's model that skips the blocks after the first when the first block's residual
    barely moved (module docstring). One instance per loop: model_calls and cached_steps count that loop."""

    def __init__(self, denoiser: Denoiser, threshold: float):
        if not float(threshold) >= 0:  # the public check (arguments.check_step_cache) is the pipeline's
            raise InputError(f"step_cache must be >= 0, got {threshold!r}")
        self.model, self.ops, self.hoist = cacheable(denoiser)
        self.dtype, self.threshold = denoiser.dtype, float(threshold)
        self.model_calls = self.cached_steps = 0

    def _mods(self, sigmas, cond: Conditioning, x):
        """Step i's modulation row (B, K): from the table made before the loop (hoisted), or made at step i as the
        model's forward does (per step)."""
        timesteps = _timesteps(sigmas, x)
        if self.hoist:
            table = self.model.modulation_table(timesteps, cond.guidance, cond.pooled, self.ops)
            return lambda i: table[i]
        return lambda i: self.model.modulation_table(timesteps[i][None], cond.guidance, cond.pooled, self.ops)[0]

    @contextmanager
    def prepare(self, sigmas, cond: Conditioning, x):
        mod_of = self._mods(sigmas, cond, x)
        model, ops = self.model, self.ops
        cache: dict[str, torch.Tensor] = {}  # r_full: first block's residual, rest: the remaining blocks', (B, N, C)

        def velocity(i: int, x: torch.Tensor) -> torch.Tensor:
            mods = mod_of(i).split(model.mod_widths, -1)
            first: FirstBlock = model.first_block(x.to(self.dtype), cond.ctx, cond.txt, mods, cond.cos, cond.sin, ops)
            out = first.x[:, : first.n]
            r = out.float() - first.x_in[:, : first.n].float()  # float32: a bf16 difference loses the small changes
            if cache and relative_l1(r, cache["r_full"]).max().item() < self.threshold:  # the host sync
                hidden = (out.float() + cache["rest"]).to(out.dtype)
                self.cached_steps += 1
            else:
                hidden = model.remaining_blocks(first, mods, cond.cos, cond.sin, ops)
                cache["r_full"], cache["rest"] = r, hidden.float() - out.float()
                self.model_calls += 1
            return model.output(hidden, mods, ops).float()  # the loop's solver takes the step

        yield velocity
