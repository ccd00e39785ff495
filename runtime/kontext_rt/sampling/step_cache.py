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
(tens of microseconds on FLUX sizes, against a full step's hundreds of milliseconds; an estimate, not measured).

With the CUDA-graphed denoiser (denoisers.Graphed) the same arithmetic runs as three captured graphs per shape
bucket (CachedStep, an entry of graphs.StepGraphs beside the plain step's): `first` (input projections, double
block 0 and delta against the static r_full), `full` (the remaining blocks and the final layer; it refreshes the
static r_full and rest) and `cached` (the final layer over the first block's output plus rest). Each step replays
`first`, reads delta on the host (the same one sync) and replays `full` or `cached`: the kernels and values of the
eager hoisted cache, bit for bit (tests/test_step_cache.py, with graphs.capture_eager). r_full and rest live with
the bucket's graphs, so a loop never reads another loop's cache: its first step runs in full. Under sequence
parallelism (model/ulysses.py) the rows are this rank's target tokens, and `first` gives the two sums of delta
over them; they are added over the ranks between the replays, outside any graph (summed_delta says why). Still to
measure on a GPU: the sync's cost between two replays, the second graph pool's memory, and the steps per second
gained.

FP8 linears are the model's own modules (model/fp8_linear.py), so the cache runs over them unchanged: the first
block and the rest run in FP8 as the uncached step does, and delta and rest stay float32. The GPU suite's
`fewer-calls` phase times a cached and a full step on its best FP8 rung, hoisted and graphed.

A TensorRT engine runs the whole transformer as one call, and a streamed placement makes one fixed pass over the
blocks per loop: neither takes a step cache (cacheable says why).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from kontext_rt.errors import InputError
from kontext_rt.model.transformer import FirstBlock
from kontext_rt.model.ulysses import SequenceParallel
from kontext_rt.sampling import check_step_cache
from kontext_rt.sampling.denoisers import Graphed, Hoisted, PerStep, _timesteps
from kontext_rt.sampling.graphs import CapturedStep
from kontext_rt.sampling.loop import Conditioning, Denoiser


def cacheable(denoiser: Denoiser) -> tuple:
    """(model, ops, hoist) of a denoiser over the runtime's model, or an InputError saying why it takes no cache."""
    found = None
    if type(denoiser) is Graphed:
        found = denoiser.hoisted.model, denoiser.hoisted.ops, True
    elif type(denoiser) is Hoisted:
        found = denoiser.model, denoiser.ops, True
    elif type(denoiser) is PerStep and denoiser.model is not None:
        found = denoiser.model, denoiser.ops, False
    if found is not None:
        return found
    raise InputError(
        f"step_cache needs the eager or triton backend with the transformer resident (this pipeline runs "
        f"{type(denoiser).__name__}): a step skips the blocks after the first, and a TensorRT engine runs the whole "
        "transformer as one call, a streamed placement one fixed pass over the blocks per loop"
    )


def relative_l1(now: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """mean |now - last| / mean |last| per batch row, in float32: (B, N, C) x 2 -> (B,)."""
    now, last = now.float(), last.float()
    return (now - last).abs().mean((1, 2)) / last.abs().mean((1, 2))


def delta(r: torch.Tensor, r_full: torch.Tensor, model=None) -> torch.Tensor:
    """The batch's decision number, a 0-d float32 tensor: every row skips together, on the largest change.

    Under sequence parallelism (model a SequenceParallel) each rank holds some of the target tokens: the two sums
    of every row are added over the ranks first, so every rank takes the same decision from every target token."""
    if not isinstance(model, SequenceParallel):
        return relative_l1(r, r_full).max()
    return summed_delta(delta_sums(r, r_full), model)


def delta_sums(r: torch.Tensor, r_full: torch.Tensor) -> torch.Tensor:
    """(2, B) float32: sum |r - r_full| and sum |r_full| of each row over this rank's target tokens."""
    r, r_full = r.float(), r_full.float()
    return torch.stack(((r - r_full).abs().sum((1, 2)), r_full.abs().sum((1, 2))))


def summed_delta(sums: torch.Tensor, model) -> torch.Tensor:
    """The decision number from every rank's delta_sums (added in place over the ranks): the counts of the two
    means cancel. Never inside a CUDA graph: a collective captured in a graph has no NCCL timeout (the process
    group's watchdog does not see it), and this one runs at every step, where a rank that stopped must be noticed."""
    sums = model.sum_over_ranks(sums)
    return (sums[0] / sums[1]).max()


def target_residual(first: FirstBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, r): double block 0's output over the target tokens (B, N, C) and its residual r = out - in in float32
    (a bf16 difference loses the small changes)."""
    out = first.x[:, : first.n]
    return out, out.float() - first.x_in[:, : first.n].float()


def from_cache(out: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """A skipped step's last hidden state: the first block's output plus the cached residual of the others."""
    return (out.float() + rest).to(out.dtype)


class CachedStep:
    """One shape bucket's step under the cache as three captured graphs (module docstring) around the cache buffers
    r_full and rest (B, N, C) float32, which live as long as the graphs. An entry of graphs.StepGraphs: built from
    Hoisted (the model, op table and dtype), the step's arguments, the capture and the pool."""

    def __init__(self, hoisted: Hoisted, args: dict, capture, pool):
        model, ops, dtype = hoisted.model, hoisted.ops, hoisted.dtype
        x, ctx = args["x"], args["ctx"]
        batch, n = x.shape[:2]
        layout = None  # one process; under sequence parallelism this rank's target tokens are the cache's rows
        if isinstance(model, SequenceParallel):
            layout = model.layout(n, n + (0 if ctx is None else ctx.shape[1]), args["txt"].shape[1])
            n = layout.targets[layout.rank]
        self.r_full = torch.zeros(batch, n, model.cfg.hidden_size, device=x.device)
        self.rest = torch.zeros_like(self.r_full)

        def first(x, mod, ctx, txt, cos, sin):
            block = model.first_block(x.to(dtype), ctx, txt, mod.split(model.mod_widths, -1), cos, sin, ops)
            _, r = target_residual(block)
            # read only once r_full is this loop's; under parallel the sums, added over the ranks after the replay
            return block.x, block.txt, r, delta(r, self.r_full) if layout is None else delta_sums(r, self.r_full)

        self.first = CapturedStep(first, args, capture, pool)
        x1, txt1, r, _ = self.first.output  # the static outputs the other two graphs read
        assert r.shape[1] == n, (r.shape, n)  # the shard first_block made is the one sized here
        static = self.first.inputs
        block = FirstBlock(x1, txt1, None, n, layout)  # x_in is not read after the first block

        def full():
            mods = static["mod"].split(model.mod_widths, -1)
            hidden = model.remaining_blocks(block, mods, static["cos"], static["sin"], ops)
            self.r_full.copy_(r)
            self.rest.copy_(hidden.float() - x1[:, :n].float())
            return model.output(hidden, mods, ops, layout).float()

        def cached():
            mods = static["mod"].split(model.mod_widths, -1)
            return model.output(from_cache(x1[:, :n], self.rest), mods, ops, layout).float()

        self.full = CapturedStep(full, {}, capture, pool)
        self.cached = CapturedStep(cached, {}, capture, pool)
        # the decision number from first's last output: as it is in one process, summed over the ranks (outside
        # the graph, on a copy of the static output) under parallel
        self.decision = (lambda d: d) if layout is None else (lambda sums: summed_delta(sums.clone(), model))
        self.load = self.first.load  # every input is the first graph's


class FirstBlockCache(Denoiser):
    """A loop over the runtime's model that skips the blocks after the first when the first block's residual
    barely moved (module docstring). One instance per loop: model_calls and cached_steps count that loop."""

    def __init__(self, denoiser: Denoiser, threshold: float | None):
        check_step_cache(threshold)  # the public check, one source: None or 0 never skips
        self.model, self.ops, self.hoist = cacheable(denoiser)
        self.graphed = denoiser if type(denoiser) is Graphed else None
        self.dtype, self.threshold = denoiser.dtype, float(threshold or 0)
        self.model_calls = self.cached_steps = 0

    def _mods(self, sigmas, cond: Conditioning, x):
        """Step i's modulation row (B, K): from the table made before the loop (hoisted), or made at step i as the
        model's forward does (per step)."""
        timesteps = _timesteps(sigmas, x)
        if self.hoist:
            table = self.model.modulation_table(timesteps, cond.guidance, cond.pooled, self.ops)
            return lambda i: table[i]
        return lambda i: self.model.modulation_table(timesteps[i][None], cond.guidance, cond.pooled, self.ops)[0]

    def prepare(self, sigmas, cond: Conditioning, x):
        return self._eager(sigmas, cond, x) if self.graphed is None else self._graphed(sigmas, cond, x)

    @contextmanager
    def _eager(self, sigmas, cond: Conditioning, x):
        mod_of = self._mods(sigmas, cond, x)
        model, ops = self.model, self.ops
        cache: dict[str, torch.Tensor] = {}  # r_full: first block's residual, rest: the remaining blocks', (B, N, C)

        def velocity(i: int, x: torch.Tensor) -> torch.Tensor:
            mods = mod_of(i).split(model.mod_widths, -1)
            first: FirstBlock = model.first_block(x.to(self.dtype), cond.ctx, cond.txt, mods, cond.cos, cond.sin, ops)
            out, r = target_residual(first)
            if cache and delta(r, cache["r_full"], model).item() < self.threshold:  # the host sync
                hidden = from_cache(out, cache["rest"])
                self.cached_steps += 1
            else:
                hidden = model.remaining_blocks(first, mods, cond.cos, cond.sin, ops)
                cache["r_full"], cache["rest"] = r, hidden.float() - out.float()
                self.model_calls += 1
            return model.output(hidden, mods, ops, first.layout).float()  # the loop's solver takes the step

        yield velocity

    @contextmanager
    def _graphed(self, sigmas, cond: Conditioning, x):
        graphed = self.graphed
        with graphed.loop(graphed.cache_graphs, sigmas, cond, x) as (mods, step):
            refreshed = False  # r_full and rest are this loop's once its first full step has run

            def velocity(i: int, x: torch.Tensor) -> torch.Tensor:
                nonlocal refreshed
                step.load(x=x, mod=mods[i])
                d = step.decision(step.first.replay()[-1])
                if refreshed and d.item() < self.threshold:  # the host sync, between two replays
                    self.cached_steps += 1
                    return step.cached.replay()  # static outputs: the solver reads them before the next replay
                refreshed = True
                self.model_calls += 1
                return step.full.replay()

            yield velocity
