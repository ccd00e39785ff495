"""Euler against DPM-Solver++ 2M on the shipped small Kontext (docs/quality.md, Solvers): the harness's scores at 4
and 8 steps (and Euler's at 28), and how far each output is from 200 Euler steps' (a stand-in for the ODE's exact
solution, seven times closer to it than 28 steps' at Euler's first order).

    python benchmarks/quality/quality_solvers.py -o runtime/kontext_toy/records/small-kontext-solvers.json

The held-out draw and seeds of `kontext-rt eval` (kontext_toy.bar.SETTINGS: 30 samples, seed 0, one drift turn),
fp32 on the CPU; every configuration runs the same samples with the same seeds (harness.compare).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from kontext_rt import Pipeline
from kontext_toy import harness, metrics, shapes
from kontext_toy.bar import SETTINGS
from kontext_toy.checkpoints import small_kontext

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]  # benchmarks/: the one timer

import timing  # noqa: E402

REFERENCE = ("euler", 200)
CONFIGS = [REFERENCE, ("euler", 28), ("euler", 4), ("dpm++2m", 4), ("euler", 8), ("dpm++2m", 8)]


class Fixed:
    """A pipeline whose edit and generate run at `steps` with `solver`, whatever steps the harness asks."""

    def __init__(self, pipe, solver: str, steps: int):
        self.pipe, self.solver, self.steps = pipe, solver, steps
        self.seconds = 0.0

    def _run(self, fn, args, kwargs):
        watch = timing.Stopwatch()  # the benchmarks' one timer
        out = fn(*args, **{**kwargs, "steps": self.steps, "solver": self.solver})
        self.seconds += watch.elapsed_s()
        return out

    def edit(self, *args, **kwargs):
        return self._run(self.pipe.edit, args, kwargs)

    def generate(self, *args, **kwargs):
        return self._run(self.pipe.generate, args, kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True, help="the JSON record to write")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(small_kontext())
    samples = list(shapes.dataset(SETTINGS["split"], SETTINGS["n"], seed=SETTINGS["sample_seed"]))
    configs = {f"{solver} {steps}": Fixed(pipe, solver, steps) for solver, steps in CONFIGS}
    found = harness.compare(
        configs, samples, seed=SETTINGS["seed"], drift_turns=SETTINGS["drift_turns"], embed=metrics.scene_embedding
    )
    record = {
        "what": __doc__.splitlines()[0],
        "command": "python benchmarks/quality/quality_solvers.py -o " + args.output,
        "settings": dict(SETTINGS),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "seconds": {name: round(p.seconds, 2) for name, p in configs.items()},
        **found,
    }
    for name in configs:
        r = found["results"][name]
        print(
            f"{name:>10}: edits {r['edit_success_rate']:.2f}, kept {r['preservation_psnr']:.2f} dB, "
            f"{found['output_psnr'][name]:.1f} dB from {REFERENCE[0]} {REFERENCE[1]}, {configs[name].seconds:.1f} s"
        )
    Path(args.output).write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
