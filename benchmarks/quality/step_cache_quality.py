"""The step cache's quality cost on the shipped small Kontext: Euler-28 without it against thresholds.

    python benchmarks/quality/step_cache_quality.py --out runtime/kontext_toy/records/small-kontext-step-cache.json

Each configuration runs kontext_toy.harness.score_split on the same 30 held-out samples and seeds (sample_seed 1,
seed 0, 28 steps, the bar's draw); a thin wrapper passes step_cache= to every edit and generate and counts the
full transformer calls from each RunReport. "output_psnr_vs_uncached" is the mean PSNR of every image (edits,
drift turns, captions, in call order) against the uncached run's: how far the cache moves the pixels, whatever the
task score. "denoise_s" is the summed denoise time of every call (CPU, this machine: the tiny model's steps are
dominated by overheads, not a GPU figure).
"""

from __future__ import annotations

import argparse
import json

from kontext_rt import Pipeline, RunReport
from kontext_toy import harness, metrics
from kontext_toy.checkpoints import small_kontext

THRESHOLDS = (None, 0.08, 0.12, 0.2)  # all, about 2/3, 1/2 and 1/3 of the 28 calls (calibrated on 10 samples)


class WithStepCache:
    """pipe's edit and generate with step_cache=threshold; model_calls / steps_run summed over every call."""

    def __init__(self, pipe: Pipeline, threshold: float | None):
        self.pipe, self.threshold = pipe, threshold
        self.vae, self.device = pipe.vae, pipe.device
        self.model_calls = self.steps_run = 0
        self.outputs, self.denoise_s = [], 0.0

    def _count(self, report: RunReport, out):
        self.model_calls += report.model_calls
        self.steps_run += report.steps
        self.denoise_s += report.timings["denoise"]
        self.outputs.append(out)

    def edit(self, *args, **kwargs):
        report = RunReport()
        out = self.pipe.edit(*args, step_cache=self.threshold, report=report, **kwargs)
        self._count(report, out)
        return out

    def generate(self, *args, **kwargs):
        report = RunReport()
        out = self.pipe.generate(*args, step_cache=self.threshold, report=report, **kwargs)
        self._count(report, out)
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=30)
    args = p.parse_args()
    pipe = Pipeline.from_pretrained(small_kontext(), backend="eager")
    results, reference = [], None
    for threshold in THRESHOLDS:
        wrapped = WithStepCache(pipe, threshold)
        r = harness.score_split(wrapped, "heldout", args.n, sample_seed=1, seed=0, steps=28, per_sample=False)
        reference = reference or wrapped.outputs
        vs = [min(metrics.psnr(a, b), harness.PSNR_CAP) for a, b in zip(wrapped.outputs, reference, strict=True)]
        row = {
            "step_cache": threshold,
            "output_psnr_vs_uncached": sum(vs) / len(vs),
            "denoise_s": wrapped.denoise_s,
            "model_calls_per_run": wrapped.model_calls / (wrapped.steps_run / 28),
            "edit_success_rate": r["edit_success_rate"],
            "preservation_psnr": r["preservation_psnr"],
            "preservation_ssim": r["preservation_ssim"],
            "drift_psnr": r["drift"]["psnr"] if r["drift"] else None,
            "generation_success_rate": r["generation_success_rate"],
            "per_kind": r["per_kind"],
        }
        print(json.dumps({k: v for k, v in row.items() if k != "per_kind"}), flush=True)
        results.append(row)
    record = {
        "what": "step cache (first-block residual) on the shipped small Kontext, held-out, Euler 28 steps",
        "command": "python benchmarks/quality/step_cache_quality.py --out " + args.out,
        "split": "heldout",
        "n": args.n,
        "sample_seed": 1,
        "seed": 0,
        "steps": 28,
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1, allow_nan=False)
        f.write("\n")


if __name__ == "__main__":
    main()
