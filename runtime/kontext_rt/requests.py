"""What a run is given and reports: RunReport, Request (one request of a batch), the checked forms the pipeline
runs from, the per-stage timer, and the argument checks shared by edit, generate and run_batch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property

import torch

from kontext_rt.errors import InputError


@dataclass
class RunReport:
    """Filled in by edit/generate when passed as report=: what ran and how long each stage took (seconds)."""

    seed: int | None = None
    steps: int = 0
    text_cache_hit: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1  # requests that shared the denoising loop (run_batch)
    model_calls: int = 0  # full transformer passes of the loop (steps, less the steps the step cache skipped)
    cached_steps: int = 0  # steps that ran only the first block and reused the step cache's residual
    context_cache_hits: int = 0  # context images whose tokens came from the context cache, not an encode
    reused_latents: int = 0  # context images that were earlier outputs, taken from their latents (reuse_latents)


@dataclass(frozen=True)
class Request:
    """One edit (context images given) or generation (none) for Pipeline.run_batch: edit/generate's arguments."""

    prompt: str
    images: tuple = ()  # paths or PIL images; empty: text-to-image
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    auto_resize: bool = True
    solver: str = "euler"  # sampling.solvers.SOLVERS
    sigmas: object = None  # explicit sigmas (a sequence of numbers, explicit_schedule's), or None: steps' schedule
    step_cache: float | None = None  # first-block residual cache threshold (sampling/step_cache.py); None/0: off
    reuse_latents: bool = False  # keep the output's latents; take kept latents for a context that is an output


@dataclass(frozen=True)
class RunPlan:
    """A run's checked arguments: the target grid, the initial noise, the schedule and its solver."""

    rows: int
    cols: int
    noise: torch.Tensor  # (B, rows * cols, 64) float32 on the CPU (moved to the device when the run starts)
    seed: int | None  # None when latents were given
    sigmas: torch.Tensor
    guidance: float
    output: str
    solver: str = "euler"


@dataclass(frozen=True)
class CheckedRequest:
    """A request with every argument checked, its images read, its noise drawn and its schedule made
    (Pipeline.check): what a batch is keyed and run from (Pipeline.run_checked)."""

    request: Request
    pils: list
    sizes: list  # (width, height) each context image is encoded at
    width: int
    height: int
    guidance: float
    steps: int  # the step count of its schedule
    plan: RunPlan
    owner: object = field(repr=False, compare=False, default=None)  # the pipeline that checked it

    @cached_property  # made once: the scheduler compares keys of every queued request
    def key(self) -> tuple:
        # the step cache decides per batch (every row skips a step or none): only requests of one threshold share
        return (
            self.width,
            self.height,
            tuple(self.sizes),
            self.steps,
            self.plan.solver,
            tuple(self.plan.sigmas.tolist()),  # one loop runs one schedule
            self.request.step_cache or None,
        )


class PhaseTimer:
    """`with PhaseTimer(report, "denoise", device):` adds the phase's seconds to report.timings[name] (after the
    device has finished its work); nothing without a report."""

    def __init__(self, report: RunReport | None, name: str, device: torch.device):
        self.report, self.name, self.device = report, name, device

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.report is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.report.timings[self.name] = self.report.timings.get(self.name, 0.0) + time.perf_counter() - self.t0


def check_progress(progress) -> None:
    if progress is not None and not callable(progress):
        raise InputError(f"progress must be a function (done, total), got {progress!r}")


def check_prompt(prompt):
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt must be a non-empty string")
