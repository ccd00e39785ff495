"""The sampling loop (loop.py), its denoisers and solvers. The solvers' names and the step cache's threshold check
are here, without torch: the CLI's parser offers them before anything heavy is imported, and the cache
(step_cache.py) checks its threshold with the pipeline's own check."""

import math

from kontext_rt.errors import InputError

SOLVERS = ("euler", "dpm++2m")  # solvers.py


def check_solver(solver) -> None:
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise InputError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")


def check_step_cache(threshold) -> None:
    """None or a finite number >= 0 (None and 0: off; sampling/step_cache.py)."""
    if threshold is None:
        return
    ok = isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold)
    if not ok or threshold < 0:
        raise InputError(
            "step_cache must be a finite number >= 0 (the relative L1 change of the first block's residual under "
            f"which a step reuses the cached residual of the others; None or 0: off), got {threshold!r}"
        )
