"""The sampling loop (loop.py), its denoisers and solvers. The solvers' names are here, without torch: the CLI's
parser offers them before anything heavy is imported."""

from kontext_rt.errors import InputError

SOLVERS = ("euler", "dpm++2m")  # solvers.py


def check_solver(solver) -> None:
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise InputError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
