"""CUDA graphs of one denoising step (the transformer's velocity), one per shape bucket.

A step reads static input buffers and writes a static output; replaying the graph reruns every kernel on whatever
the buffers hold, with no Python and no launches on the host. The cache keys each graph on the name, shape, dtype
and device of *every* tensor argument (a text-to-image call has no context tensor: that is part of the key too) and
on the weights' version, which the pipeline bumps whenever it changes weights (LoRA fuse/unfuse). A new shape
captures a new graph; a changed weights version drops every graph; loading a tensor whose shape or dtype differs
from the buffer's is an error, so a stale graph is never replayed on a buffer it was not captured with.

A cache's graphs share one memory pool (their intermediates are reused across buckets; replays never overlap: the cache
holds a lock for a whole sampling loop). A bucket's entry is one CapturedStep by default; the step cache's entry
(sampling/step_cache.py: CachedStep) is three of them around shared buffers. Capture is injected: tests and the GPU
suite's CPU rehearsal run the cache's logic with `capture_eager`, a stand-in that recomputes the step into the same
static output.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager

import torch

Signature = tuple


def signature(args: dict[str, torch.Tensor | None]) -> Signature:
    """What a graph was captured for: (name, shape, dtype, device) of every argument, None for absent ones."""
    return tuple(
        (name, None) if t is None else (name, tuple(t.shape), t.dtype, str(t.device))
        for name, t in sorted(args.items())
    )


class CapturedStep:
    """One captured step: its static inputs, its static output (a tensor or a tuple of them), and `replay` to run it
    again."""

    def __init__(self, fn: Callable[..., torch.Tensor], args: dict[str, torch.Tensor | None], capture, pool):
        # static buffers are the graph's own copies: later calls copy into them, never rebind them
        self.inputs = {k: None if t is None else t.clone() for k, t in args.items()}
        self._replay, self.output = capture(fn, self.inputs, pool)

    def load(self, **tensors: torch.Tensor) -> None:
        """Copy new values into the static buffers; a shape or dtype change is refused (it needs another graph)."""
        for name, t in tensors.items():
            buf = self.inputs[name]
            if buf is None or t is None:
                if buf is not t:
                    raise ValueError(f"graph input {name!r} was captured as {'absent' if buf is None else 'present'}")
                continue
            if t.shape != buf.shape or t.dtype != buf.dtype:
                raise ValueError(
                    f"graph input {name!r} was captured as {tuple(buf.shape)} {buf.dtype}, got "
                    f"{tuple(t.shape)} {t.dtype}: that is another graph's bucket"
                )
            buf.copy_(t, non_blocking=True)

    def replay(self):
        self._replay()
        return self.output


def capture_cuda(fn, inputs: dict[str, torch.Tensor | None], pool):
    """Warm up on a side stream (Triton autotuning, cuBLAS workspaces), then capture fn(**inputs) into a graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(**inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn(**inputs)
    return graph.replay, output


def _tensors(output) -> tuple:
    return (output,) if isinstance(output, torch.Tensor) else tuple(output)


def capture_eager(fn, inputs: dict[str, torch.Tensor | None], pool):
    """A stand-in for capture_cuda on any device: 'replay' recomputes fn from the static inputs into the static
    output, so the static-buffer plumbing is exercised as a real replay reads it (a stale buffer, or a graph reused
    for another shape, shows as a wrong result)."""
    output = fn(**inputs)

    def replay():
        for buf, t in zip(_tensors(output), _tensors(fn(**inputs)), strict=True):
            buf.copy_(t)

    return replay, output


class StepGraphs:
    """The graph cache of one pipeline: signature -> entry (a CapturedStep of fn unless `entry` builds another kind
    from fn, the arguments, capture and the pool), least recently used dropped past max_graphs. Caches given one
    `lock` take turns: a capture never runs beside another cache's replay."""

    def __init__(self, fn, capture=capture_cuda, max_graphs: int = 8, entry=CapturedStep, lock=None):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.fn, self.capture, self.max_graphs, self.entry = fn, capture, max_graphs, entry
        self._graphs: OrderedDict[Signature, CapturedStep] = OrderedDict()
        self._version = None
        self._pool = None
        self._lock = threading.Lock() if lock is None else lock
        self.captures = 0  # how many graphs were captured in all (tests and benchmarks read it)

    def __len__(self) -> int:
        return len(self._graphs)

    def keys(self) -> list[Signature]:
        return list(self._graphs)

    def clear(self) -> None:
        with self._lock:
            self._graphs.clear()

    @contextmanager
    def session(self, args: dict[str, torch.Tensor | None], version):
        """The entry for these arguments (captured now if new), held exclusively for one sampling loop."""
        with self._lock:
            if version != self._version:
                self._graphs.clear()  # weights changed: every graph would read them, none may be reused
                self._version = version
            key = signature(args)
            entry = self._graphs.get(key)
            if entry is None:
                if self._pool is None and self.capture is capture_cuda:
                    self._pool = torch.cuda.graph_pool_handle()
                entry = self.entry(self.fn, args, self.capture, self._pool)
                self.captures += 1
                self._graphs[key] = entry
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
            yield entry
