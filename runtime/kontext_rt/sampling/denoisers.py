"""The denoisers the one sampling loop (sampling.loop.denoise) drives, from the plainest to the fastest.

- PerStep: any velocity function with the model's call signature (the runtime's model with an op table, or the
  TensorRT transformer engine); each step computes its own conditioning and modulation.
- Hoisted: the runtime's model with every step's modulation computed before the loop
  (FluxTransformer.modulation_table: one matmul per layer over all steps' rows instead of reading the 3.2B
  modulation parameters again at every step). With the triton table (row-invariant linears) it equals PerStep bit
  for bit (tests/test_hoisting.py).
- Graphed: Hoisted's velocity captured as a CUDA graph per shape bucket (graphs.StepGraphs) and replayed; equal to
  Hoisted bit for bit (tests/test_graphs.py). Under the step cache, three graphs per bucket (step_cache.py).

Each yields velocity(i, x) -> v float32; the loop's solver (solvers.py) takes the step, outside any graph.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager

import torch

from kontext_rt.model.op_table import Ops
from kontext_rt.sampling.graphs import StepGraphs, capture_cuda
from kontext_rt.sampling.loop import Conditioning, Denoiser


def _timesteps(sigmas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """timesteps (S, B) on x's device: the schedule crosses to the device once, before the loop."""
    return sigmas.to(x.device)[:-1, None].expand(-1, x.shape[0])


class PerStep(Denoiser):
    """velocity(img, ctx, txt, pooled, timesteps, guidance, cos, sin) called at every step."""

    def __init__(self, velocity: Callable[..., torch.Tensor], dtype: torch.dtype):
        self.velocity, self.dtype = velocity, dtype
        self.model = self.ops = None  # the runtime's model and op table, when velocity is that model (of_model)

    @classmethod
    def of_model(cls, model, ops: Ops, dtype: torch.dtype) -> PerStep:
        denoiser = cls(lambda *args: model(*args, ops), dtype)
        denoiser.model, denoiser.ops = model, ops
        return denoiser

    @contextmanager
    def prepare(self, sigmas, cond: Conditioning, x):
        timesteps = _timesteps(sigmas, x)

        def velocity(i: int, x: torch.Tensor) -> torch.Tensor:
            v = self.velocity(
                x.to(self.dtype), cond.ctx, cond.txt, cond.pooled, timesteps[i], cond.guidance, cond.cos, cond.sin
            )
            return v.float()

        yield velocity


class Hoisted(Denoiser):
    """The runtime's model with the modulation table of every step computed in prepare."""

    def __init__(self, model, ops: Ops, dtype: torch.dtype):
        self.model, self.ops, self.dtype = model, ops, dtype

    def velocity(self, x, mod, ctx, txt, cos, sin) -> torch.Tensor:
        """The float32 velocity at the float32 state x (B, N, 64) with this step's modulation row mod (B, K)."""
        return self.model.velocity(x.to(self.dtype), ctx, txt, mod, cos, sin, self.ops).float()

    def plan(self, sigmas, cond: Conditioning, x) -> torch.Tensor:
        """The modulation table (S, B, K) on x's device: everything the loop reads per step."""
        return self.model.modulation_table(_timesteps(sigmas, x), cond.guidance, cond.pooled, self.ops)

    @contextmanager
    def prepare(self, sigmas, cond: Conditioning, x):
        mods = self.plan(sigmas, cond, x)
        yield lambda i, x: self.velocity(x, mods[i], cond.ctx, cond.txt, cond.cos, cond.sin)


class Graphed(Denoiser):
    """Hoisted's velocity captured once per shape bucket and replayed; graphs of older weights are never replayed.
    The solver's update runs after the replay, eagerly: the same kernels on the same values as Hoisted's loop.
    The step cache's three graphs per bucket (step_cache.CachedStep) are a second graph cache beside the first,
    captured only when a loop with a step cache runs, and dropped with the others when the weights change; both
    caches share one lock, so one loop at a time replays (or captures) this denoiser's graphs."""

    def __init__(self, model, ops: Ops, dtype: torch.dtype, capture=capture_cuda, max_graphs: int = 8):
        from kontext_rt.sampling.step_cache import CachedStep  # here: step_cache imports this module

        self.hoisted = Hoisted(model, ops, dtype)
        self.dtype = dtype
        lock = threading.Lock()
        self.graphs = StepGraphs(self.hoisted.velocity, capture, max_graphs, lock=lock)
        self.cache_graphs = StepGraphs(self.hoisted, capture, max_graphs, entry=CachedStep, lock=lock)
        self._version = 0

    def weights_changed(self) -> None:
        self._version += 1

    @contextmanager
    def loop(self, graphs: StepGraphs, sigmas, cond: Conditioning, x):
        """(the modulation table, graphs' entry for this loop's bucket with the conditioning loaded), the entry held
        for the whole loop."""
        mods = self.hoisted.plan(sigmas, cond, x)
        fixed = dict(ctx=cond.ctx, txt=cond.txt, cos=cond.cos, sin=cond.sin)
        with graphs.session(dict(x=x, mod=mods[0], **fixed), self._version) as entry:
            entry.load(**fixed)  # the conditioning once per loop, then two small copies per step
            yield mods, entry

    @contextmanager
    def prepare(self, sigmas, cond: Conditioning, x):
        with self.loop(self.graphs, sigmas, cond, x) as (mods, graph):

            def velocity(i: int, x: torch.Tensor) -> torch.Tensor:
                graph.load(x=x, mod=mods[i])
                return graph.replay()  # the static output: the solver reads it before the next replay

            yield velocity


def for_model(
    model,
    ops: Ops,
    dtype: torch.dtype,
    hoist: bool = True,
    cuda_graphs: bool = False,
    capture=capture_cuda,
    max_graphs: int = 8,
) -> Denoiser:
    """The denoiser the speed options ask for over the runtime's own model."""
    if cuda_graphs:
        return Graphed(model, ops, dtype, capture, max_graphs)
    return Hoisted(model, ops, dtype) if hoist else PerStep.of_model(model, ops, dtype)
