"""diffusers run in float64: the exact side of the float32 comparisons (tolerances from a reference, not magic numbers).

Two float32 implementations of the same math should differ by about their rounding noise. That noise is measured,
not guessed: diffusers' own float32 result against the same diffusers computation in float64. The runtime then has
to be as close to the float64 result as twice diffusers' own float32 error (the kernel tests' rule), which also
bounds its distance to diffusers' float32 result by three times that error (triangle inequality).

diffusers in float64 keeps two float32 islands: RoPE (cos/sin tables and the rotation upcast to float32) and the
sinusoidal time embedding. They cost ~2e-9 relative on the tiny model's forward (measured against the runtime's
own float64 forward), 100x below the float32 error of ~2e-7, so they do not weaken the bound. Its Euler step rounds
the state to float32 after every step (measured 3-7e-8 relative after 3-8 steps, as large as the float32 error
itself); Float64Euler keeps the state in float64 instead.
"""

from __future__ import annotations

import torch


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def float32_noise(want32, want64) -> float:
    """diffusers' own float32 error: its float32 result against its float64 one (relative, Frobenius)."""
    return rel_err(want32, want64)


def assert_float32_close(ours, want32, want64, what=""):
    """ours (float32) within twice diffusers' float32 error of the float64 result, hence within three times of
    diffusers' float32 result."""
    noise = float32_noise(want32, want64)
    assert noise > 0, f"{what}: the float64 reference equals the float32 run: it is not a float64 run"
    err64, err32 = rel_err(ours, want64), rel_err(ours, want32)
    assert err64 <= 2 * noise, f"{what}: {err64:.3g} from float64 > 2 x diffusers' float32 error {noise:.3g}"
    assert err32 <= 3 * noise, f"{what}: {err32:.3g} from diffusers float32 > 3 x its float32 error {noise:.3g}"


def float64_euler_scheduler(config, **overrides):
    """diffusers' FlowMatchEulerDiscreteScheduler with the same sigmas, whose step keeps a float64 state (diffusers'
    own step rounds the state to float32 every step)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class Float64Euler(FlowMatchEulerDiscreteScheduler):
        def step(self, model_output, timestep, sample, *args, return_dict=True, **kwargs):
            if self.step_index is None:
                self._init_step_index(timestep)
            dt = self.sigmas[self.step_index + 1].double() - self.sigmas[self.step_index].double()
            self._step_index += 1
            out = sample.double() + dt * model_output.double()
            return (out,) if not return_dict else type("Out", (), {"prev_sample": out})()

    return Float64Euler.from_config(config, **overrides)


def float64_pipeline(cls, folder, **scheduler_overrides):
    """A diffusers pipeline class loaded in float64 from folder, with the float64-state Euler scheduler (its config
    the folder's, with scheduler_overrides)."""
    pipe = cls.from_pretrained(folder, local_files_only=True, dtype=torch.float64)
    pipe.scheduler = float64_euler_scheduler(pipe.scheduler.config, **scheduler_overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kontext_call(img, prompt: str, h: int, w: int, **extra) -> dict:
    """FluxKontextPipeline's arguments for a latent-out edit of img at h x w exactly (no auto-resize)."""
    args = dict(image=img, prompt=prompt, guidance_scale=2.5, output_type="latent", max_area=h * w, height=h, width=w)
    return {**args, "_auto_resize": False, **extra}


def image_ids(grids) -> torch.Tensor:
    """img_ids by the published Kontext rule: the target (0, r, c), then context image i (i, r, c); grids are
    (rows, cols) in tokens, the target's first."""
    ids = []
    for i, (rows, cols) in enumerate(grids):
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        ids.append(torch.stack([torch.full_like(r, i), r, c], -1).reshape(-1, 3))
    return torch.cat(ids).float()


@torch.no_grad()
def diffusers_euler(transformer, x, txt, pooled, ctx, grids, sigmas, guidance):
    """The Euler loop over diffusers' FluxTransformer2DModel, in the transformer's dtype: packed target tokens x
    (1, N, 64), context tokens ctx (1, M, 64) or None, text txt (1, T, D) and pooled (1, D'). Each step reads the
    velocity of the target tokens (the first N); the step size is taken in float64."""
    dtype, n = transformer.dtype, x.shape[1]
    x, txt, pooled = x.to(dtype), txt.to(dtype), pooled.to(dtype)
    ids = image_ids(grids)
    g = torch.tensor([guidance], dtype=dtype) if transformer.config.guidance_embeds else None
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        hidden = x if ctx is None else torch.cat([x, ctx.to(dtype)], 1)
        v = transformer(
            hidden_states=hidden,
            encoder_hidden_states=txt,
            pooled_projections=pooled,
            timestep=torch.tensor([s], dtype=dtype),
            guidance=g,
            txt_ids=torch.zeros(txt.shape[1], 3),
            img_ids=ids,
            return_dict=False,
        )[0][:, :n]
        x = x + (s_next - s) * v
    return x
