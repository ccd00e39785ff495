"""The per-run arguments of edit and generate (size, steps, guidance, seed, solver), checked before any work.

Pipeline.edit/generate call `check` first thing; the CLI calls it before it even loads a checkpoint.
"""

from __future__ import annotations

import math

from kontext_rt import image as im
from kontext_rt.errors import InputError
from kontext_rt.sampling import SOLVERS, check_solver, check_step_cache  # noqa: F401 (the per-run checks, in one place)

# torch.Generator.manual_seed takes [-2**63, 2**64 - 1] and maps a negative seed s to 2**64 - 1 + s, so the
# non-negative range below already names every generator state; anything larger overflows inside torch.
SEED_MAX = 2**64 - 1
# The distilled-guidance range of ComfyUI's FluxGuidance node. FLUX's own defaults are 2.5 (Kontext), 3.5 (dev);
# the model embeds guidance * 1000 as a timestep, so a huge value overflows and an infinite one gives NaN pixels.
GUIDANCE_MIN, GUIDANCE_MAX = 0.0, 100.0


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_seed(seed) -> None:
    if not _is_int(seed) or not 0 <= seed <= SEED_MAX:
        raise InputError(f"seed must be a non-negative integer up to 2**64-1 (torch's generator range), got {seed!r}")


def check_guidance(guidance) -> None:
    ok = isinstance(guidance, (int, float)) and not isinstance(guidance, bool) and math.isfinite(guidance)
    if not ok or not GUIDANCE_MIN <= guidance <= GUIDANCE_MAX:
        raise InputError(f"guidance must be a number in [{GUIDANCE_MIN:g}, {GUIDANCE_MAX:g}], got {guidance!r}")


def check_steps(steps) -> None:
    if not _is_int(steps) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")


def check(width=None, height=None, steps=None, guidance=None, seed=None) -> None:
    """Each argument given (not None, which means "the default") is checked; InputError names the first bad one."""
    for name, side in (("width", width), ("height", height)):
        if side is not None:
            im.check_side(name, side)
    if steps is not None:
        check_steps(steps)
    if guidance is not None:
        check_guidance(guidance)
    if seed is not None:
        check_seed(seed)


def parse_sigmas(value):
    """explicit_schedule of a comma list ("1.0,0.75,0.5,0.25,0", the CLI's --sigmas and the server's form field)
    or of a sequence of numbers (the server's JSON list): the float32 tensor; one InputError line for anything else."""
    if isinstance(value, str):
        try:
            value = [float(p) for p in value.split(",")]
        except ValueError:
            raise InputError(
                f"sigmas must be a comma list of numbers such as 1.0,0.75,0.5,0.25,0; got {value!r}"
            ) from None
    if isinstance(value, (list, tuple)) and any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise InputError(f"sigmas must be numbers, got {value!r}")
    from kontext_rt.sampling.schedule import explicit_schedule  # torch: only when sigmas are given

    return explicit_schedule(value)
