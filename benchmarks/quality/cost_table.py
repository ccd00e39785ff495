"""What fewer model calls cost on the shipped small Kontext: the cost table and its chart (docs/quality.md).

    python benchmarks/quality/cost_table.py --out runtime/kontext_toy/records/small-kontext-cost-table.json \\
        --chart docs/images/quality-vs-calls.png
    python benchmarks/quality/cost_table.py --render runtime/kontext_toy/records/small-kontext-cost-table.json

Every setting (SETTINGS: Euler at 28/14/8/4 steps, DPM-Solver++ 2M at 14/8/4, the step cache at three thresholds
giving about 2/3, 1/2 and 1/3 of Euler-28's calls, and Euler-28 with each turn's latents handed to the next) edits
the same held-out samples with the same seeds: the bar's draw (kontext_toy.bar.SETTINGS: 30 samples, sample_seed
1, seed 0) with DRIFT_TURNS chained edit-then-undo turns per recolour sample, scored by
kontext_toy.harness.compare against Euler-28. Per setting: full transformer calls per run (RunReport.model_calls,
averaged over every edit and generation), edit success, kept PSNR / SSIM, the PSNR to the source after each drift
turn, the mean PSNR of every output against Euler-28's for the same sample and seed ("vs Euler-28": how far the
setting moves the pixels, whatever the score), and CPU milliseconds per run (every phase of RunReport.timings, one
thread, this machine: the tiny model's CPU time, never a GPU figure).

"fast" is the setting the goal asks for: at most FAST_CALLS full calls, edit success within 0.03 of Euler-28's and
kept PSNR within 1 dB; of those, the nearest to Euler-28's pixels.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kontext_rt import Pipeline, RunReport
from kontext_toy import harness, shapes
from kontext_toy.bar import SETTINGS as BAR
from kontext_toy.checkpoints import small_kontext

DRIFT_TURNS = 3
FAST_CALLS, FAST_SUCCESS, FAST_KEPT_DB = 10, 0.03, 1.0


@dataclass(frozen=True)
class Setting:
    name: str
    family: str  # the chart's line: euler, dpm++2m, step cache, latents kept
    steps: int
    options: dict = field(default_factory=dict)  # edit/generate keyword arguments


SETTINGS = (
    Setting("Euler 28", "euler", 28),  # the reference: first
    Setting("Euler 14", "euler", 14),
    Setting("Euler 8", "euler", 8),
    Setting("Euler 4", "euler", 4),
    Setting("DPM++2M 14", "dpm++2m", 14, {"solver": "dpm++2m"}),
    Setting("DPM++2M 8", "dpm++2m", 8, {"solver": "dpm++2m"}),
    Setting("DPM++2M 4", "dpm++2m", 4, {"solver": "dpm++2m"}),
    Setting("Euler 28, step cache 0.08", "step cache", 28, {"step_cache": 0.08}),
    Setting("Euler 28, step cache 0.12", "step cache", 28, {"step_cache": 0.12}),
    Setting("Euler 28, step cache 0.2", "step cache", 28, {"step_cache": 0.2}),
    Setting("Euler 28, latents kept", "latents kept", 28, {"reuse_latents": True}),
)


class Counted:
    """A pipeline whose edit and generate run at the setting's steps and options (whatever steps the harness asks),
    summing each run's full model calls and phase seconds from its RunReport."""

    def __init__(self, pipe: Pipeline, setting: Setting):
        self.pipe, self.setting = pipe, setting
        self.runs = self.model_calls = self.reused_latents = 0
        self.seconds = 0.0

    def _run(self, fn, args, kwargs, options):
        report = RunReport()
        out = fn(*args, **{**kwargs, "steps": self.setting.steps, **options, "report": report})
        self.runs += 1
        self.model_calls += report.model_calls
        self.reused_latents += report.reused_latents
        self.seconds += sum(report.timings.values())
        return out

    def edit(self, *args, **kwargs):
        return self._run(self.pipe.edit, args, kwargs, self.setting.options)

    def generate(self, *args, **kwargs):
        options = {k: v for k, v in self.setting.options.items() if k != "reuse_latents"}  # no context to reuse
        return self._run(self.pipe.generate, args, kwargs, options)

    def __getattr__(self, name):  # vae, device: what the harness's metrics read
        return getattr(self.pipe, name)


def measure(settings=SETTINGS, n: int = BAR["n"], drift_turns: int = DRIFT_TURNS, progress=print) -> dict:
    """The record: every setting's row, on as many threads as the caller runs (main: one)."""
    # no context cache but where the setting uses it: every other setting pays its own encodes (CPU ms comparable)
    plain = Pipeline.from_pretrained(small_kontext(), context_cache_size=0)
    kept = Pipeline.from_pretrained(small_kontext())
    samples = list(shapes.dataset(BAR["split"], n, seed=BAR["sample_seed"]))
    configs = {s.name: Counted(kept if s.options.get("reuse_latents") else plain, s) for s in settings}
    found = harness.compare(configs, samples, seed=BAR["seed"], drift_turns=drift_turns)
    rows = []
    for s in settings:
        r, c = found["results"][s.name], configs[s.name]
        rows.append(
            {
                "setting": s.name,
                "family": s.family,
                "steps": s.steps,
                "options": s.options,
                "model_calls": c.model_calls / c.runs,
                "edit_success_rate": r["edit_success_rate"],
                "preservation_psnr": r["preservation_psnr"],
                "preservation_ssim": r["preservation_ssim"],
                "drift_psnr": r["drift"]["psnr"] if r["drift"] else None,
                "output_psnr_vs_reference": found["output_psnr"][s.name],
                "cpu_ms_per_run": 1000 * c.seconds / c.runs,
                "runs": c.runs,
                "reused_latents": c.reused_latents,  # contexts taken from an earlier output's latents
                "per_kind": {k: v["success_rate"] for k, v in r["per_kind"].items()},
            }
        )
        progress(render_row(rows[-1]))
    return {
        "what": __doc__.splitlines()[0],
        "split": BAR["split"],
        "n": n,
        "sample_seed": BAR["sample_seed"],
        "seed": BAR["seed"],
        "drift_turns": drift_turns,
        "reference": settings[0].name,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "fast": fast_choice(rows),
    }


def fast_choice(rows: list[dict]) -> str | None:
    """The goal's setting: <= FAST_CALLS calls, success and kept PSNR near the reference's; the nearest pixels."""
    ref = rows[0]
    ok = [
        r
        for r in rows
        if r["model_calls"] <= FAST_CALLS
        and r["edit_success_rate"] >= ref["edit_success_rate"] - FAST_SUCCESS - 1e-9
        and r["preservation_psnr"] >= ref["preservation_psnr"] - FAST_KEPT_DB
    ]
    return max(ok, key=lambda r: r["output_psnr_vs_reference"])["setting"] if ok else None


HEADER = (
    "| setting | full model calls | edit success | kept PSNR / SSIM | drift, turns 1-{turns} (dB) | vs Euler-28 | "
    "CPU ms / run |"
)


def render_row(r: dict) -> str:
    drift = ", ".join(f"{v:.2f}" for v in r["drift_psnr"] or [])
    vs = f"{r['output_psnr_vs_reference']:.1f} dB"
    if r["output_psnr_vs_reference"] >= harness.PSNR_CAP:  # every output identical (the reference: itself)
        vs = "-" if r["family"] == "euler" and r["steps"] == 28 else "identical"
    return (
        f"| {r['setting']} | {r['model_calls']:.1f} | {r['edit_success_rate']:.2f} | "
        f"{r['preservation_psnr']:.2f} dB / {r['preservation_ssim']:.3f} | {drift} | {vs} | "
        f"{r['cpu_ms_per_run']:.0f} |"
    )


def render(record: dict) -> str:
    """The markdown table docs/quality.md shows (tests/test_cost_table.py checks it is there, row for row)."""
    lines = [HEADER.format(turns=record["drift_turns"]), "|" + "---|" * 7]
    lines += [render_row(r) for r in record["rows"]]
    return "\n".join(lines)


def draw(record: dict, path: Path) -> None:
    """Quality against full model calls, one line per family, the fast choice ringed: edit success, kept PSNR (the
    goal's band shaded: within FAST_KEPT_DB of Euler-28's), the PSNR to the source after the last drift turn, and
    the PSNR to Euler-28's outputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, turns = record["rows"][0], record["drift_turns"]
    panels = (
        ("edit_success_rate", "held-out edit success", lambda r: r["edit_success_rate"]),
        ("preservation_psnr", "kept PSNR (dB)", lambda r: r["preservation_psnr"]),
        ("drift", f"PSNR to the source after {turns} turns (dB)", lambda r: (r["drift_psnr"] or [None])[-1]),
        ("vs", "PSNR to Euler-28's outputs (dB; 100: identical)",
         lambda r: min(r["output_psnr_vs_reference"], harness.PSNR_CAP)),
    )  # fmt: skip
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    families = dict.fromkeys(r["family"] for r in record["rows"])
    markers = dict(zip(families, "osD^v", strict=False))
    fast = next((r for r in record["rows"] if r["setting"] == record["fast"]), None)
    for ax, (key, label, value) in zip(axes.flat, panels, strict=True):
        for fam in families:
            rows = sorted((r for r in record["rows"] if r["family"] == fam), key=lambda r: r["model_calls"])
            ax.plot([r["model_calls"] for r in rows], [value(r) for r in rows], markers[fam] + "-", label=fam)
        if fast is not None:
            ax.plot(
                [fast["model_calls"]], [value(fast)], "o", ms=14, mfc="none", mec="k", label=f"fast: {fast['setting']}"
            )
        if key == "edit_success_rate":
            ax.axhspan(ref[key] - FAST_SUCCESS, ref[key], color="0.9", zorder=0)
            ax.set_ylim(0, 1.05)
        if key == "preservation_psnr":
            ax.axhspan(ref[key] - FAST_KEPT_DB, ref[key] + FAST_KEPT_DB, color="0.9", zorder=0)
        ax.axvline(FAST_CALLS, color="0.6", ls=":", lw=1)
        ax.set(xlabel="full transformer calls per edit", ylabel=label)
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"Fewer model calls on the small Kontext: held-out, n={record['n']} (grey: the goal's band; dotted: "
        f"{FAST_CALLS} calls)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})  # no version stamp: the same record, the same file
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="the JSON record to write (runs every setting: a few minutes on one core)")
    ap.add_argument("--chart", help="the PNG chart to draw from the record")
    ap.add_argument("--render", metavar="RECORD", help="print the markdown table of a record (and draw --chart)")
    ap.add_argument("--n", type=int, default=BAR["n"], help=f"held-out samples (default {BAR['n']}, the bar's)")
    args = ap.parse_args(argv)
    if (args.out is None) == (args.render is None):
        ap.error("give --out (measure) or --render RECORD")
    if args.render:
        record = json.loads(Path(args.render).read_text())
    else:
        torch.set_num_threads(1)  # the CPU ms of one core; the process's own setting, not a library's
        record = measure(n=args.n, progress=lambda line: print(line, file=sys.stderr, flush=True))
        record["command"] = "python benchmarks/quality/cost_table.py " + " ".join(argv or sys.argv[1:])
        Path(args.out).write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    if args.chart:
        draw(record, Path(args.chart))
    print(render(record))
    print(f"\nfast: {record['fast']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
