"""The sampling loop over the runtime's own model, with nothing invariant inside it.

Before the first step: the schedule on the device, the Euler step sizes, and the modulation table of every step
(FluxTransformer.modulation_table: the conditioning and modulation linears for all steps in one matmul per layer).
Text embeddings, context latents and RoPE tables arrive already computed (Pipeline). Each step is then
`step(x, mod, dt, ...)`: the transformer with its modulation row given, and the Euler update, exactly what
sampler.denoise does per step (tests/test_hoisting.py checks the two agree bit for bit with the triton table).
With CUDA graphs the step is captured once per shape bucket (graphs.StepGraphs) and replayed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .graphs import StepGraphs, capture_cuda
from .ops import Ops
from .sampler import Conditioning


class Stepper:
    def __init__(self, model, ops: Ops, dtype: torch.dtype, cuda_graphs: bool = False, capture=capture_cuda,
                 max_graphs: int = 8):
        self.model, self.ops, self.dtype = model, ops, dtype
        self.graphs = StepGraphs(self.step, capture, max_graphs) if cuda_graphs else None

    def step(self, x, mod, dt, ctx, txt, cos, sin) -> torch.Tensor:
        """One Euler step of the float32 state x (B, N, 64) with this step's modulation row mod (B, K), dt (0-d)."""
        v = self.model.velocity(x.to(self.dtype), ctx, txt, mod, cos, sin, self.ops)
        return x + dt * v.float()

    def plan(self, x: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """(modulation table (S, B, K), step sizes (S,)) on x's device: everything the loop reads per step."""
        sigmas = sigmas.to(x.device)  # once: no host-to-device copy inside the loop
        timesteps = sigmas[:-1, None].expand(-1, x.shape[0])
        mods = self.model.modulation_table(timesteps, cond.guidance, cond.pooled, self.ops)
        return mods, sigmas[1:] - sigmas[:-1]

    @torch.inference_mode()
    def denoise(self, x: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                progress: Callable[[int, int], None] | None = None, version=0) -> torch.Tensor:
        """The loop; `version` identifies the weights (graphs captured for other weights are dropped).

        Always in inference mode: the graphs' static buffers are made on the first call and loaded on every later
        one, and a tensor made in inference mode cannot be updated in place outside it (or the reverse)."""
        x = x.float()
        mods, dts = self.plan(x, sigmas, cond)
        steps = len(dts)
        fixed = dict(ctx=cond.ctx, txt=cond.txt, cos=cond.cos, sin=cond.sin)
        if self.graphs is None:
            for i in range(steps):
                x = self.step(x, mods[i], dts[i], **fixed)
                if progress is not None:
                    progress(i + 1, steps)
            return x
        with self.graphs.session(dict(x=x, mod=mods[0], dt=dts[0], **fixed), version) as graph:
            graph.load(x=x, **fixed)  # the conditioning once per loop, then two small copies per step
            for i in range(steps):
                graph.load(mod=mods[i], dt=dts[i])
                out = graph.replay()
                if i + 1 < steps:
                    graph.load(x=out)
                if progress is not None:
                    progress(i + 1, steps)
            return out.clone()  # the static output is overwritten by the next loop
