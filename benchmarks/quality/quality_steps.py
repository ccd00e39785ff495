"""What benchmarks/quality/quality_report.py follows step by step: the latent after every denoising step of an edit,
and the exported transformer graph in ONNX Runtime as a denoiser's model."""

from __future__ import annotations

import statistics
from contextlib import contextmanager
from pathlib import Path

import torch

from kontext_rt.backends import graph_io as io
from kontext_rt.sampling import solvers
from kontext_rt.sampling.loop import Denoiser
from kontext_toy import harness, metrics
from kontext_toy.shapes import EditSample


class Recording(Denoiser):
    """Another denoiser, keeping a copy of the float32 state after every Euler step taken with its velocities
    (x + (s[i+1] - s[i]) * v, the default solver's arithmetic)."""

    def __init__(self, inner: Denoiser):
        self.inner, self.dtype = inner, inner.dtype
        self.states: list[torch.Tensor] = []

    @contextmanager
    def prepare(self, sigmas, cond, x):
        euler = solvers.Euler(sigmas, x.device)
        with self.inner.prepare(sigmas, cond, x) as velocity:

            def recorded(i: int, x: torch.Tensor) -> torch.Tensor:
                v = velocity(i, x)
                self.states.append(euler.step(i, x, v))
                return v

            yield recorded


@contextmanager
def recording(pipe):
    """pipe's denoiser wrapped in a Recording for the duration."""
    inner = pipe.denoiser
    pipe.denoiser = rec = Recording(inner)
    try:
        yield rec
    finally:
        pipe.denoiser = inner


def trajectories(pipe, samples, steps: int, seed: int) -> list[tuple[list[torch.Tensor], object]]:
    """(latent after each step, decoded image) of every edit sample, sample i with seed + i as the harness runs it."""
    out = []
    for i, s in enumerate(samples):
        if isinstance(s, EditSample):
            with recording(pipe) as rec:
                image = pipe.edit(s.source, s.instruction, steps=steps, seed=seed + i, auto_resize=False)
            out.append((rec.states, image))
    return out


def step_drift(reference: list, other: list) -> dict:
    """RMS over the samples of (other's latent - reference's) after each step; the final images' PSNR (capped)."""
    if len(reference) != len(other) or not reference:
        raise ValueError("step_drift needs the same non-empty list of samples on both sides")
    pairs = list(zip(reference, other, strict=True))
    steps = len(reference[0][0])
    return {
        "rms": [statistics.fmean(_ms(b[k] - a[k]) for (a, _), (b, _) in pairs) ** 0.5 for k in range(steps)],
        "reference_rms": [statistics.fmean(_ms(a[k]) for a, _ in reference) ** 0.5 for k in range(steps)],
        "final_image_psnr": statistics.fmean(min(metrics.psnr(b, a), harness.PSNR_CAP) for (_, a), (_, b) in pairs),
    }


def _ms(x: torch.Tensor) -> float:
    """Mean square, in float64."""
    return float((x.double() ** 2).mean())


class OrtTransformer:
    """The exported transformer graph in an ONNX Runtime session, called as the runtime's model is by PerStep:
    velocity(img, ctx, txt, pooled, timesteps, guidance, cos, sin). The graph takes the context tokens appended
    to img and returns a velocity for every token; the target's are the first img.shape[1]."""

    def __init__(self, path: Path, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, img, ctx, txt, pooled, timesteps, guidance, cos, sin):
        n = img.shape[1]
        full = img if ctx is None else torch.cat([img, ctx.to(img.dtype)], 1)
        feed = {io.IMG: full, io.TXT: txt, io.POOLED: pooled, io.TIMESTEPS: timesteps, io.COS: cos, io.SIN: sin}
        if io.GUIDANCE in self.inputs:
            feed[io.GUIDANCE] = guidance
        arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in feed.items()}
        (velocity,) = self.session.run([io.VELOCITY], arrays)
        return torch.from_numpy(velocity[:, :n].copy())
