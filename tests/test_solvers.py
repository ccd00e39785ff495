"""The sampling loop's solvers (kontext_rt.sampling.solvers): Euler unchanged, DPM-Solver++ 2M as diffusers'
DPMSolverMultistepScheduler defines it (flow sigmas, flow prediction, dpmsolver++, order 2, midpoint,
lower_order_final, final_sigmas_type="zero"), and the orders of both on an ODE whose solution is known."""

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_rt import Pipeline
from kontext_rt.sampling import solvers
from tests.float64_reference import assert_float32_close, kontext_call

DPM_CONFIG = dict(
    use_flow_sigmas=True,
    prediction_type="flow_prediction",
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    final_sigmas_type="zero",
)
SIGMAS = [0.96, 0.8, 0.45, 0.1]  # tests/test_pipeline_reference.py's: below 1, so step 2 is second order


def dpm_scheduler(float64=False, **config):
    """diffusers' DPMSolverMultistepScheduler taking explicit sigmas (its set_timesteps has no `sigmas`): used as
    given with a terminal 0, timesteps sigma * 1000 as FlowMatchEulerDiscreteScheduler makes them. float64: its
    sigmas and its update in float64 (diffusers' step casts the state to float32 first); the order of the updates
    (first order on the first and the final step) copied from its step."""
    from diffusers import DPMSolverMultistepScheduler

    class Explicit(DPMSolverMultistepScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
            super().set_timesteps(num_inference_steps=len(sigmas), device=device)
            s = torch.tensor([*sigmas, 0.0], dtype=torch.float64 if float64 else torch.float32)
            self.sigmas, self.timesteps = s, (s[:-1].float() * 1000).to(device)
            self.num_inference_steps = len(sigmas)

        def step(self, model_output, timestep, sample, return_dict=True, **kw):
            if not float64:
                return super().step(model_output, timestep, sample, return_dict=return_dict, **kw)
            if self.step_index is None:
                self._init_step_index(timestep)
            final = self.step_index == len(self.timesteps) - 1  # final_sigmas_type="zero": first order
            m = self.convert_model_output(model_output.double(), sample=sample.double())
            self.model_outputs = [*self.model_outputs[1:], m]
            if self.lower_order_nums < 1 or final:
                out = self.dpm_solver_first_order_update(m, sample=sample.double())
            else:
                out = self.multistep_dpm_solver_second_order_update(self.model_outputs, sample=sample.double())
            self.lower_order_nums = min(self.lower_order_nums + 1, 2)
            self._step_index += 1
            return (out,) if not return_dict else type("Out", (), {"prev_sample": out})()

    return Explicit(**{**DPM_CONFIG, **config})


# ---- the update, on a fixed sequence of velocities ----------------------------------------------------------------


@pytest.mark.parametrize("sigmas", [SIGMAS, [1.0, 0.75, 0.5, 0.25], [0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05], [0.5]])
def test_dpm_update_is_diffusers(sigmas):
    """The same velocities into ours and into diffusers' scheduler (float32 and float64): ours within twice
    diffusers' own float32 error of the float64 result (tests/float64_reference.py). Sigma 1 first (alpha 0,
    lambda -inf) and a single step are edge cases of diffusers' formulas."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 64, generator=gen)
    vs = [torch.randn(2, 16, 64, generator=gen) for _ in sigmas]
    ref32, ref64 = dpm_scheduler(), dpm_scheduler(float64=True)
    want32, want64, ours = x, x.double(), x
    for ref in (ref32, ref64):
        ref.set_timesteps(sigmas=sigmas)
    solve = solvers.make("dpm++2m", torch.tensor([*sigmas, 0.0]), x.device)
    for i, v in enumerate(vs):
        want32 = ref32.step(v, ref32.timesteps[i], want32).prev_sample
        want64 = ref64.step(v.double(), ref64.timesteps[i], want64).prev_sample
        ours = solve.step(i, ours, v)
    assert want64.dtype == torch.float64 and ours.dtype == torch.float32
    if len(sigmas) == 1:  # one step to 0: x0 = x - sigma v in both, the same float32 operations
        assert torch.equal(ours, want32)
        return
    assert_float32_close(ours, want32, want64, f"dpm++2m over {sigmas}")


# ---- the orders, on an ODE whose solution is known ----------------------------------------------------------------

MEAN, STD = 0.7, 0.3  # data ~ N(MEAN, STD^2), x_sigma = (1 - sigma) x0 + sigma noise


def exact(sigma, noise):
    """The flow ODE of Gaussian data moves each point along its quantile: mean (1-s) MEAN, std sqrt((1-s)^2 STD^2
    + s^2), starting from the noise at sigma 1."""
    return (1 - sigma) * MEAN + math.sqrt((1 - sigma) ** 2 * STD**2 + sigma**2) * noise


def velocity(x, sigma):
    """(x - E[x0 | x]) / sigma, the exact flow velocity of Gaussian data."""
    var = (1 - sigma) ** 2 * STD**2 + sigma**2
    x0 = MEAN + (1 - sigma) * STD**2 / var * (x - (1 - sigma) * MEAN)
    return (x - x0) / sigma


def ode_error(name, n, start=0.9, stop=0.1) -> float:
    """Max error of n steps from `start` to `stop` in float64 (uniform sigmas; the loop's terminal step to 0 is
    not taken: it is first order in both solvers by definition, lower_order_final)."""
    noise = torch.linspace(-2, 2, 9, dtype=torch.float64)
    sigmas = torch.cat([torch.linspace(start, stop, n + 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    solve, x = solvers.make(name, sigmas, noise.device), exact(start, noise)
    for i in range(n):
        x = solve.step(i, x, velocity(x, float(sigmas[i])))
    return float((x - exact(stop, noise)).abs().max())


@pytest.mark.parametrize("name,order", [("euler", 1), ("dpm++2m", 2)])
def test_order_on_a_known_ode(name, order):
    """Doubling the steps divides the error by 2^order: the observed order log2(e_n / e_2n) within 0.1 of it
    at 128 -> 256 steps (it converges to it from the start: 0.97, 0.99 for Euler and 1.9, 1.95 for 2M at 32 ->
    64 and 64 -> 128)."""
    errors = [ode_error(name, n) for n in (128, 256)]
    assert abs(math.log2(errors[0] / errors[1]) - order) < 0.1, errors


def test_dpm_is_more_accurate_than_euler_at_few_steps():
    assert ode_error("dpm++2m", 8) < ode_error("euler", 8) / 4


# ---- through the pipeline -----------------------------------------------------------------------------------------


def picture(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


class Recording:
    """A denoiser wrapper keeping the sigmas of the loop and every (state in, velocity out)."""

    def __init__(self, inner):
        self.inner, self.dtype, self.calls = inner, inner.dtype, []

    @contextmanager
    def prepare(self, sigmas, cond, x):
        self.sigmas = sigmas.clone()
        with self.inner.prepare(sigmas, cond, x) as velocity:

            def recorded(i, x):
                v = velocity(i, x)
                self.calls.append((x.clone(), v.clone()))
                return v

            yield recorded


@pytest.fixture(scope="module")
def pipe(kontext_dir):
    return Pipeline.from_pretrained(kontext_dir)


@pytest.mark.parametrize("solver", [None, "euler"])
def test_euler_is_the_default_and_is_the_euler_step(pipe, solver, monkeypatch):
    """Each step of the default loop is x + (s[i+1] - s[i]) * v in float32, bit for bit: the arithmetic the loop
    did before solvers existed (sigmas on the state's device, their differences, one multiply-add)."""
    monkeypatch.setattr(pipe, "denoiser", rec := Recording(pipe.denoiser))
    kw = {} if solver is None else {"solver": solver}
    out = pipe.edit(picture(32, 48), "make it red", steps=4, seed=3, auto_resize=False, output="latent", **kw)
    s = rec.sigmas
    states = [x for x, _ in rec.calls] + [out]
    assert len(rec.calls) == 4
    for i, (x, v) in enumerate(rec.calls):
        assert torch.equal(states[i + 1], x + (s[i + 1] - s[i]) * v), i


def test_dpm_matches_diffusers_pipeline(kontext_dir):
    """FluxKontextPipeline with diffusers' DPMSolverMultistepScheduler (dpm_scheduler) on the same weights, the
    same latents and explicit sigmas, in float32 and float64 (the transformer too): ours within twice diffusers'
    float32 error of the float64 result (tests/float64_reference.py, as the Euler parity tests)."""
    from diffusers import FluxKontextPipeline

    pipe = Pipeline.from_pretrained(kontext_dir, max_sequence_length=8)
    flux = FluxKontextPipeline.from_pretrained(kontext_dir, local_files_only=True)
    flux.scheduler = dpm_scheduler()
    flux64 = FluxKontextPipeline.from_pretrained(kontext_dir, local_files_only=True, dtype=torch.float64)
    flux64.scheduler = dpm_scheduler(float64=True)
    h, w = 32, 48
    img, lat = picture(h, w), torch.randn(1, (h // 16) * (w // 16), 64, generator=torch.Generator().manual_seed(7))
    args = kontext_call(img, "few steps", h, w, sigmas=SIGMAS, max_sequence_length=8)
    for p in (flux, flux64):
        p.set_progress_bar_config(disable=True)
    want = flux(latents=lat, **args).images
    want64 = flux64(latents=lat.double(), **args).images
    euler = pipe.edit(img, "few steps", sigmas=SIGMAS, auto_resize=False, latents=lat, output="latent")
    ours = pipe.edit(img, "few steps", sigmas=SIGMAS, auto_resize=False, latents=lat, output="latent", solver="dpm++2m")
    assert torch.equal(flux.scheduler.sigmas, torch.tensor(SIGMAS + [0.0]))  # diffusers did use them
    assert_float32_close(ours, want, want64, "dpm++2m pipeline")
    # and the solvers differ by far more than that: the test would see Euler in dpm++2m's place
    assert (ours - euler).norm() > 100 * (want - want64.float()).norm()


def test_graphed_loop_runs_dpm_as_the_hoisted_loop(kontext_dir):
    """The graph holds the velocity only: the solver's state (the previous x0) lives outside it, so the graphed
    loop (the capture stand-in of tests/test_graphs.py) equals the hoisted one bit for bit, twice in a row."""
    from kontext_rt.model.op_table import EAGER_OPS
    from kontext_rt.sampling.denoisers import Graphed
    from kontext_rt.sampling.graphs import capture_eager

    pipe = Pipeline.from_pretrained(kontext_dir)
    kw = dict(sigmas=SIGMAS, auto_resize=False, seed=5, output="latent", solver="dpm++2m")
    want = pipe.edit(picture(32, 48), "x", **kw)
    pipe.denoiser = Graphed(pipe.transformer, EAGER_OPS, torch.float32, capture=capture_eager)
    for _ in range(2):
        assert torch.equal(pipe.edit(picture(32, 48), "x", **kw), want)
