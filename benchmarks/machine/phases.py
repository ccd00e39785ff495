"""Phases of a GPU run, each recorded the moment it ends, so a run killed at its time limit keeps what it finished.

A GPU session gets one command of at most 10 minutes, and only the files already written when it ends come back.
So every script of the GPU run (gpu_run.py, gpu_suite.py) keeps its results in one dict, runs its work as named
phases, and rewrites its JSON atomically (a temporary name, then a rename) after each phase, with a flushed
one-line progress message before and after. A phase that raises is recorded as failed, with the error, and the
next phase runs; a phase whose prerequisites failed, or whose estimated cost no longer fits before the deadline,
is recorded as skipped with the reason. `broken` names phases to fail on purpose (the CPU rehearsal's check that
one failure neither stops the others nor goes unreported).
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the results' writer, by plain name
from run_folder import write_json  # noqa: E402


class Broken(RuntimeError):
    """Raised by a phase named in `broken`."""


class PhaseError(RuntimeError):
    """A phase failure with details for its record (exit status, output tail, ...)."""

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


def say(message: str) -> None:
    print(message, flush=True)


class Record:
    """One results file: `data` (with data["phases"][name] = status), rewritten after every phase."""

    def __init__(
        self,
        path: Path,
        data: dict,
        deadline_s: float,
        tag: str,
        broken: Iterable[str] = (),
        before_write: Callable[[], None] | None = None,
        t0: float | None = None,
    ):
        """deadline_s counts from t0 (a time.perf_counter() value; default: now)."""
        self.path, self.data, self.tag = Path(path), data, tag
        self.t0, self.deadline_s = time.perf_counter() if t0 is None else t0, deadline_s
        self.broken = set(broken)
        self.before_write = before_write
        data.setdefault("phases", {})

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0

    def left_s(self) -> float:
        return self.deadline_s - self.elapsed_s()

    def write(self) -> None:
        if self.before_write is not None:
            self.before_write()
        self.data["wall_s"] = round(self.elapsed_s(), 2)
        write_json(self.path, self.data)

    def run(self, name: str, fn: Callable[[], dict | None], needs: Iterable[str] = (), estimate_s: float = 0.0) -> bool:
        """Run one phase unless a prerequisite is not ok or it would not fit; True when it ran and succeeded.
        A dict fn returns (or a PhaseError's details) is kept in the phase's record."""
        phases = self.data["phases"]
        not_ok = [n for n in needs if phases.get(n, {}).get("status") != "ok"]
        if not_ok:
            entry = {"status": "skipped", "reason": f"needs {', '.join(not_ok)}, which did not succeed"}
        elif estimate_s > self.left_s():
            entry = {
                "status": "skipped",
                "reason": f"needs about {estimate_s:.0f} s, {max(self.left_s(), 0):.0f} s "
                f"left before the {self.deadline_s:.0f} s deadline",
            }
        else:
            say(f"[{self.tag} {self.elapsed_s():6.1f}s] {name} ...")
            t0 = time.perf_counter()
            try:
                if name in self.broken:
                    raise Broken(f"phase {name!r} broken on purpose (--break)")
                entry = {"status": "ok", **(fn() or {})}
            except PhaseError as err:
                entry = {"status": "failed", "error": str(err)[:2000], **err.details}
            except Exception as err:  # recorded, and the next phase runs: one failure must not lose the others
                entry = {
                    "status": "failed",
                    "error": f"{type(err).__name__}: {err}"[:2000],
                    "traceback": traceback.format_exc()[-4000:],
                }
            entry["s"] = round(time.perf_counter() - t0, 2)
        phases[name] = entry
        self.write()
        detail = entry.get("error") or entry.get("reason") or f"{entry['s']} s"
        say(f"[{self.tag} {self.elapsed_s():6.1f}s] {name}: {entry['status']} ({detail.splitlines()[0][:300]})")
        return entry["status"] == "ok"

    def failed(self) -> list[str]:
        return [n for n, e in self.data["phases"].items() if e["status"] == "failed"]

    def incomplete(self) -> list[str]:
        """Phases that failed or were skipped: the results are not whole."""
        return [n for n, e in self.data["phases"].items() if e["status"] != "ok"]


def add_break_option(parser, help: str) -> None:
    """--break PHASE (repeatable, into args.broken): the one spelling gpu_run and gpu_suite share."""
    parser.add_argument("--break", dest="broken", action="append", default=[], metavar="PHASE", help=help)
