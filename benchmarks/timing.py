"""The benchmarks' one timer: every script times its calls here, so a millisecond means the same in each.

One timed call gives a Sample. On a GPU, `ms` is the device's time (a CUDA event recorded before the call and one
after it, read once the device has finished), `host_ms` the wall time until the call returned (the CPU's cost of
issuing the work) and `wall_ms` the wall time until the device finished. On a CPU all three are the wall time
(time.perf_counter). `cpu_ms` is this process's CPU time for the call (time.process_time: time on a core, page
faults included, time waiting for a core excluded). Warm-up calls run untimed first (autotuning, graph capture,
compilation, first-call allocations), then the device is synchronized. A figure is the median of its samples,
with the quartiles as its noise band where there are enough of them.

    ms = time_ms(fn, device, warmup=5, reps=20)         # a kernel: the median device ms
    samples = repeat(fn, device, reps=3, warmup=1)      # a loop: ms and host_ms of each run
    out, sample = timed(fn, device)                     # one call (an edit, an HTTP request)
    watch = Stopwatch(device)                           # a span that is not one call; watch.lap as a progress callback
    benchmark(synced(fn, device))                       # pytest-benchmark, whose timer does not wait for a GPU

The GPU run's deadlines (machine/gpu_run.py, machine/phases.py) are budgets, not measurements: they keep their own
clock, and the run's driver never imports torch for it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    """Wait for every stream of a CUDA device; nothing on a CPU."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Sample:
    """One timed call, in milliseconds (see the module's docstring)."""

    ms: float  # device time on a GPU (CUDA events), the wall time on a CPU
    host_ms: float  # wall time until the call returned
    wall_ms: float  # wall time until the device finished it too
    cpu_ms: float  # this process's CPU time until the call returned


def timed(fn: Callable[[], object], device="cpu") -> tuple[object, Sample]:
    """(fn(), its Sample). Work already queued on the device before the call is not waited for: synchronize first
    (time_ms and repeat do) unless it is part of what is measured."""
    cuda = is_cuda(device)
    c0 = time.process_time()  # a system call: outside the device's span
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    out = fn()
    host_ms, cpu_ms = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
    if not cuda:
        return out, Sample(host_ms, host_ms, host_ms, cpu_ms)
    end.record()
    sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3
    return out, Sample(start.elapsed_time(end), host_ms, wall_ms, cpu_ms)


def repeat(fn: Callable[[], object], device="cpu", reps: int = 20, warmup: int = 0) -> list[Sample]:
    """`warmup` untimed calls, a device sync, then `reps` timed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    return [timed(fn, device)[1] for _ in range(reps)]


def time_ms(fn: Callable[[], object], device="cpu", warmup: int = 5, reps: int = 20) -> float:
    """The median `ms` of fn() (device time on a GPU) over `reps` calls after `warmup` untimed ones."""
    return statistics.median(s.ms for s in repeat(fn, device, reps, warmup))


def synced(fn: Callable[[], object], device) -> Callable[[], object]:
    """fn followed by a device sync: for timers that do not wait for a GPU themselves (pytest-benchmark's)."""

    def call():
        out = fn()
        sync(device)
        return out

    return call


class Stopwatch:
    """Wall seconds of a span that is not one call, read after a device sync: elapsed_s() since the start, lap()
    since the previous lap (laps_s keeps them; lap takes any arguments, so it serves as a progress callback)."""

    def __init__(self, device="cpu"):
        self.device = device
        self.laps_s: list[float] = []
        self.restart()

    def restart(self) -> None:
        sync(self.device)
        self.t0 = self.last = time.perf_counter()

    def elapsed_s(self) -> float:
        sync(self.device)
        return time.perf_counter() - self.t0

    def lap(self, *_) -> float:
        sync(self.device)
        now = time.perf_counter()
        self.laps_s.append(now - self.last)
        self.last = now
        return self.laps_s[-1]


def quartiles(xs: list[float]) -> dict:
    """Median, quartiles (inclusive method) and extremes: a figure and its noise band (at least two values)."""
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "min": min(xs), "max": max(xs)}


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile (0 <= q <= 1) of values: one of the values themselves."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]
