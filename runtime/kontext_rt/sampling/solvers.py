"""How the sampling loop combines the denoiser's velocities into steps: Euler (the default) or DPM-Solver++ 2M.

Both read one velocity v (B, N, 64) float32 per step and keep the state float32. DPM-Solver++ 2M is diffusers'
DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="dpmsolver++",
solver_order=2, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero") on the given sigmas:
the data prediction x0 = x - sigma * v, alpha = 1 - sigma, lambda = log(alpha / sigma), h = lambda_t - lambda_s;
first order on the first step and on the last (to sigma 0), second order (the previous x0 too) in between. Its
first-order step is Euler's step in exact arithmetic (x0 substituted), not in float32: euler stays the default.
"""

from __future__ import annotations

import torch

from kontext_rt.sampling import SOLVERS, check_solver

__all__ = ["SOLVERS", "DPMSolverPP2M", "Euler", "check_solver", "make"]


class Euler:
    """x + (s[i+1] - s[i]) * v: the step sizes cross to the device once, before the loop."""

    def __init__(self, sigmas: torch.Tensor, device: torch.device):
        sigmas = sigmas.to(device)
        self.dts = sigmas[1:] - sigmas[:-1]

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return x + self.dts[i] * v


def dpm_coefficients(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, c) per step, float64: x_next = a x + b x0 + c (x0 - x0_prev), diffusers' midpoint 2M update with
    a = sigma_t / sigma_s, b = -alpha_t (e^-h - 1), c = b / (2 r0), r0 = h_prev / h; c = 0 on first-order steps.
    sigma 1 (alpha 0) gives lambda -inf and sigma 0 gives +inf: h = inf, e^-h = 0, 1 / r0 = 0, as in diffusers."""
    s = sigmas.double()
    lam = torch.log(1 - s) - torch.log(s)
    h = lam[1:] - lam[:-1]
    a = s[1:] / s[:-1]
    b = -(1 - s[1:]) * torch.expm1(-h)
    c = torch.zeros_like(b)
    if len(b) > 2:  # the first step has no previous x0; the last, to sigma 0, is first order (final_sigmas_type)
        inv_r0 = h[1:-1] / h[:-2]  # 1 / r0 = h / h_0, h_0 the previous step's h
        c[1:-1] = 0.5 * b[1:-1] * inv_r0
    return a, b, c


class DPMSolverPP2M:
    """Second-order multistep: one velocity per step, the previous step's data prediction kept."""

    def __init__(self, sigmas: torch.Tensor, device: torch.device):
        a, b, c = dpm_coefficients(sigmas)
        self.sigmas = sigmas.to(device)
        self.a, self.b, self.c = (t.to(device, sigmas.dtype) for t in (a, b, c))  # float32 from the pipeline
        self.x0_prev: torch.Tensor | None = None

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x0 = x - self.sigmas[i] * v
        out = self.a[i] * x + self.b[i] * x0
        if self.x0_prev is not None:
            out = out + self.c[i] * (x0 - self.x0_prev)
        self.x0_prev = x0
        return out


def make(name: str, sigmas: torch.Tensor, device: torch.device):
    """The solver of one sampling loop over `sigmas` (steps + 1 values ending in 0); it holds that loop's state."""
    check_solver(name)
    return {"euler": Euler, "dpm++2m": DPMSolverPP2M}[name](sigmas, device)
