"""The quality bar of the small Kontext shipped in the package (kontext_rt.demo.small_kontext()).

One configuration of the harness (SETTINGS: held-out samples, their seeds, steps, drift turns) and the least each
aggregate may score there (BAR). The thresholds were set from training run 3's score in this configuration
(benchmarks/results/small-kontext-train-tuned.json) and a rerun of that run from the same seed
(small-kontext-train-tuned-replicate.json), a margin below the lower of the two. The shipped model continues run 3
(runs 4 to 7) and scores above them; they are far above what the random-weight demo checkpoint scores
(tests/test_small_kontext.py checks both, in CI).
"""

from __future__ import annotations

from types import MappingProxyType

SETTINGS = MappingProxyType({"split": "heldout", "n": 30, "sample_seed": 1, "steps": 8, "seed": 0, "drift_turns": 1})
# aggregate (a dotted key of harness.evaluate's result, list items by index) -> the least it may be. Training run 3
# scores 0.48 (12 of 25 edits), recolour 0.4 (2 of 5), removal 0.8, 22.22 dB, 0.735 and 17.52 dB here; its rerun from
# the same seed 0.48, 0.4, 0.6, 21.96 dB, 0.730 and 18.30 dB; run 4 (small-kontext-train-run4.json) 0.60, 0.4, 0.8,
# 23.02 dB, 0.782 and 21.79 dB; run 5 (continued from run 4, small-kontext-train-run5.json) 0.68, 0.4, 1.0,
# 23.13 dB, 0.789 and 22.04 dB; run 6 (run 5 with its VAE's decoder retrained, small-kontext-train-run6.json) 0.76,
# 0.6, 1.0, 24.75 dB, 0.828 and 23.25 dB; the shipped model (run 7: run 5's transformer trained further, with run 6's
# VAE, small-kontext-train-run7-paired.json) 0.76, 0.6, 1.0, 26.39 dB, 0.855 and 25.13 dB; the random-weight demo
# checkpoint 0, 0, 0, 7.88 dB, 0.043 and 7.53 dB.
# Each threshold is one sample (edits), one sample of five (a kind), about 2 dB or 0.05 SSIM under the lower of the
# two runs, so a change of kernels or BLAS that moves a borderline pixel does not fail it, and a broken model does.
BAR = MappingProxyType(
    {
        "edit_success_rate": 0.44,
        "per_kind.recolour.success_rate": 0.2,
        "per_kind.remove.success_rate": 0.4,
        "preservation_psnr": 20.0,
        "preservation_ssim": 0.68,
        "drift.psnr.0": 15.5,
    }
)


def _get(result, key: str):
    for part in key.split("."):
        if isinstance(result, dict):
            result = result.get(part)
        elif isinstance(result, list) and part.isdigit() and int(part) < len(result):
            result = result[int(part)]
        else:
            return None
    return result


def failures(result: dict) -> list[str]:
    """The aggregates under the bar, each as 'name value < threshold' (a missing one counts as under)."""
    out = []
    for key, least in BAR.items():
        value = _get(result, key)
        if value is None or value < least:
            out.append(f"{key} {'missing' if value is None else f'{value:.3g}'} < {least}")
    return out


def evaluate(pipe) -> dict:
    """harness.evaluate in the bar's configuration."""
    from kontext_rt.quality import harness, shapes

    s = SETTINGS
    samples = list(shapes.dataset(s["split"], s["n"], seed=s["sample_seed"], size=64))
    return harness.evaluate(
        pipe, samples, steps=s["steps"], seed=s["seed"], drift_turns=s["drift_turns"], per_sample=False
    )
