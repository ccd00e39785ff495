"""The chart of benchmarks/quality/quality_report.py's JSON: quality against steps and options, drift over turns and
steps.

1a  edit success and preservation PSNR of fp32 eager at 28, 8 and 4 steps
1b  the same per precision / backend option, at the report's step count
2   the multi-turn drift: PSNR to the source after each edit-then-undo turn, per option
3   the per-step drift: RMS of each option's latent against fp32's after the same step (log scale)
"""

from __future__ import annotations

from pathlib import Path

REFERENCE = "fp32"


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def _label(result: dict, group: dict, name: str) -> str:
    """The option's name (the reference's with its steps), with the sample count when a group ran on fewer."""
    label = f"{REFERENCE}-{group['steps']}" if name == REFERENCE else name
    return label if group["n"] == result["samples"]["n"] else f"{label} (n={group['n']})"


def _option_rows(result: dict) -> list[tuple[str, dict]]:
    """(label, quality) of the precision and triton groups' options, each once."""
    rows = {}
    for g in ("precision", "triton"):
        group = result["groups"].get(g)
        for name, o in group["options"].items() if group else ():
            rows.setdefault(_label(result, group, name), o["quality"])
    return list(rows.items())


def _success_and_psnr(ax, x, labels, qualities, title: str, lines: bool) -> None:
    ax.plot(x, [_nan(q["edit_success_rate"]) for q in qualities], "o-" if lines else "o", color="tab:blue")
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("edit success rate", color="tab:blue")
    right = ax.twinx()
    right.plot(x, [_nan(q["preservation_psnr"]) for q in qualities], "s--" if lines else "s", color="tab:red")
    right.set_ylabel("preservation PSNR (dB)", color="tab:red")
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center")
    ax.set_title(title)


def _drift_turns(ax, result: dict) -> None:
    import matplotlib

    ax.set_prop_cycle(color=matplotlib.colormaps["tab20"].colors)  # more options than the default ten colours
    turns = 0
    for group in result["groups"].values():
        for name, o in group["options"].items():
            label = _label(result, group, name)
            drift = o["quality"]["drift"]
            if drift and label not in ax.get_legend_handles_labels()[1]:
                turns = max(turns, len(drift["psnr"]))
                ax.plot(range(1, len(drift["psnr"]) + 1), [_nan(v) for v in drift["psnr"]], "o-", label=label)
    ax.set(xlabel="turn (an edit, then its undo)", ylabel="PSNR to the source (dB)", title="2. multi-turn drift")
    if turns:
        ax.set_xticks(range(1, turns + 1))
        ax.legend(fontsize=8)


def _per_step(ax, result: dict) -> None:
    from matplotlib.ticker import MaxNLocator

    options = result["per_step_drift"]["options"]
    for name, d in options.items():
        label = f"{name} (final image {d['final_image_psnr']:.1f} dB)"
        ax.plot(range(1, len(d["rms"]) + 1), d["rms"], "o-", label=label)
    ax.set_yscale("log", nonpositive="mask")
    ax.set(xlabel="step", ylabel=f"latent RMS vs {REFERENCE}", title="3. per-step latent drift")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if options:
        ax.legend(fontsize=8)


def draw(result: dict, path: Path) -> None:
    """Write the four panels as a PNG at path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    sched = list(result["groups"].get("schedule", {}).get("options", {}).values())
    steps = [o["quality"]["steps"] for o in sched]
    qualities = [o["quality"] for o in sched]
    _success_and_psnr(axes[0][0], steps, [str(s) for s in steps], qualities, "1a. fp32 eager: steps", True)
    rows = _option_rows(result)
    x = list(range(len(rows)))
    _success_and_psnr(
        axes[0][1], x, [n for n, _ in rows], [q for _, q in rows], f"1b. at {result['steps']} steps", False
    )
    _drift_turns(axes[1][0], result)
    _per_step(axes[1][1], result)
    fig.suptitle(f"{result['checkpoint']['path']}: n={result['samples']['n']}, seed={result['samples']['seed']}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)
