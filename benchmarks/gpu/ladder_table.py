"""The GPU tables of docs/benchmarks.md (and the README's speed table), as Markdown, from the files one
`bash benchmarks/gpu_run.sh` brought back.

    python benchmarks/gpu/ladder_table.py benchmarks/results/<device>-<date>/ [--png]
    python benchmarks/gpu/ladder_table.py --rungs       # the table of rungs (rungs.py), as the docs show it

Reads suite.json, suite-torchao.json and suite-compile.json (if present) and kernels.json (if present) from that
folder and prints the speed ladder (with diffusers in the same run as the baseline), the end-to-end edits, the H100
goals beside what was measured, and the fused attention kernel's rate. Every figure is copied from the JSON, never
typed by hand; the rows follow rungs.py's order (a rung an older run has and the table no longer does comes after
them). --png redraws the folder's suite-ladder.png from both parts' ladders: for a compile part run in its own
command, whose chart has only its own rung.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the rungs and the suite's parts, by plain name
from rungs import GOALS, RUNGS, goals, ordered  # noqa: E402


def _load(folder: Path, name: str) -> dict:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else {}


def _later_parts(folder: Path) -> dict:
    """The rungs of the parts run after the core, each in its own process (suite-torchao.json, suite-compile.json),
    as one result: their ladders merged."""
    found = [_load(folder, f"suite-{part}.json") for part in ("torchao", "compile")]
    return {"ladder": {k: v for part in found for k, v in part.get("ladder", {}).items()}}


def _ms(row, layout):
    cell = row.get(layout)
    return f"{cell['ms_per_step']:.1f}" if cell else "-"


def ladder(suite: dict, compiled: dict) -> list[str]:
    rungs = {**suite.get("ladder", {}), **compiled.get("ladder", {})}
    base = suite.get("diffusers", {})
    base_ms = base.get("kontext", {}).get("ms_per_step")
    lines = [
        "| rung | Kontext ms/step | x diffusers | MFU | host ms/step | text-to-image ms/step | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    if base:
        peak = base.get("kontext", {}).get("peak_gib")
        lines.append(
            f"| diffusers (baseline, eager bf16) | {_ms(base, 'kontext')} | 1.00 | | "
            f"{base.get('kontext', {}).get('host_ms_per_step', 0):.1f} | {_ms(base, 'text-to-image')} | "
            f"{'' if peak is None else f'{peak:.1f}'} |"
        )
    for name in ordered(rungs):
        row = rungs[name]
        k = row.get("kontext")
        if not k:
            continue
        speedup = f"{base_ms / k['ms_per_step']:.2f}" if base_ms else ""
        peak = "" if k.get("peak_gib") is None else f"{k['peak_gib']:.1f}"
        lines.append(
            f"| {name} | {k['ms_per_step']:.1f} | {speedup} | {k['mfu']:.2f} | {k['host_ms_per_step']:.1f} | "
            f"{_ms(row, 'text-to-image')} | {peak} |"
        )
    return lines


def edits(suite: dict) -> list[str]:
    e2e = suite.get("end_to_end_s", {})
    if not e2e:
        return []
    steps = sorted({int(s) for runs in e2e.values() for s in runs})
    lines = ["| rung | " + " | ".join(f"{s}-step edit, s" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    lines += [
        f"| {rung} | " + " | ".join(f"{runs[str(s)]:.2f}" if str(s) in runs else "-" for s in steps) + " |"
        for rung, runs in ((name, e2e[name]) for name in ordered(e2e))
    ]
    return lines


def goals_table(suite: dict, compiled: dict) -> list[str]:
    """The H100 goals against both parts' rungs (rungs.goals over the merged ladder)."""
    merged = {**suite, "ladder": {**suite.get("ladder", {}), **compiled.get("ladder", {})}}
    g = goals(merged)
    lines = [f"| goal (H100) | target | measured on {suite.get('device', '?')} | met |", "|---|---|---|---|"]
    for key, target in g["targets"].items():
        value = g.get(key)
        met = "" if value is None else ("yes" if value <= target else "no")
        lines.append(f"| {key} | <= {target} | {'-' if value is None else f'{value:.2f}'} | {met} |")
    if g["faster_than_diffusers"]:
        slower = [r for r, faster in g["faster_than_diffusers"].items() if not faster]
        verdict = "yes" if not slower else f"no ({', '.join(slower)})"
        lines.append(f"\nFaster than diffusers at every rung: {verdict}")
    return lines


def profile(suite: dict, top: int = 10) -> list[str]:
    """The ops that take a step's time, per profiled rung (gpu_suite's profile phases)."""
    lines = []
    for rung, found in suite.get("profile", {}).items():
        lines += [
            f"Where a {rung} Kontext step goes ({found['clock']} time, {found['total_ms_per_step']:.1f} ms per "
            "step in all, profiled):",
            "",
            "| op | calls per step | ms per step | share |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| `{o['name'][:70]}` | {o['calls_per_step']:g} | {o['ms_per_step']:.2f} | {o['share']:.1%} |"
            for o in found["ops"][:top]
        ]
        lines.append("")
    return lines[:-1]


def rungs_table() -> list[str]:
    """The ladder itself: each rung, what it adds, the goal it counts toward, and how a pipeline is loaded to run
    it."""
    targets = {g.key: g.target for g in GOALS}
    lines = ["| rung | adds to the rung above | counts toward (H100) | as a pipeline loads it |", "|---|---|---|---|"]
    for r in RUNGS:
        goal = f"{r.goal} <= {targets[r.goal]}" if r.goal else ""
        lines.append(f"| {r.name} | {r.adds} | {goal} | `{r.settings()}` |")
    return lines


def kernels(data: dict) -> list[str]:
    g = data.get("goals_one_context")
    if not isinstance(g, dict) or not g:
        return []
    line = (
        f"Fused attention at 8704 tokens: {g['fused_ms']:.3f} ms, {g['fused_tflops']:.0f} TFLOP/s; best SDPA with "
        f"separate norm+RoPE ({g['best_sdpa_with_separate_rope']}): {g['best_sdpa_with_separate_rope_ms']:.3f} ms"
    )
    if g.get("backend_ms") is not None:
        line += f"; the triton backend's attention (norm+RoPE kernel, SDPA default): {g['backend_ms']:.3f} ms"
    lines = [line + "."]
    prepass = data.get("attention_prepass", {}).get("one-context")
    if prepass:  # the GB/s of each pre-pass mode at 8704 tokens, against the copy rate
        rows = [
            f"{name} {r['gbs']:.0f} GB/s ({100 * r['fraction_of_copy_rate']:.0f}% of copy)"
            for name, r in prepass["timings"].items()
            if "gbs" in r
        ]
        lines.append("Attention pre-pass at 8704 tokens: " + "; ".join(rows) + ".")
    return lines


def fewer_calls(suite: dict) -> list[str]:
    """The fewer-calls phase: each denoiser's Euler and DPM++2M step, and the step cache's full and cached step."""
    found = suite.get("fewer_calls")
    if not found:
        return []
    denoisers = [k.removesuffix(" euler") for k in found if k.endswith(" euler")]
    lines = [
        f"| {found['rung']} rung, Kontext layout | Euler ms/step | DPM++2M ms/step | step cache: full / cached ms "
        "| 28 steps at 10 full calls, s |",
        "|---|---|---|---|---|",
    ]
    for d in denoisers:
        cache = found.get(f"{d} step cache", {})
        if "cached_step_ms" in cache:
            cached = f"{cache['full_step_ms']:.1f} / {cache['cached_step_ms']:.1f}"
            loop = f"{cache['loop_28_steps_10_calls_s']:.2f}"
        else:
            cached, loop = "refused" if "refused" in cache else "-", "-"
        euler, dpm = found[f"{d} euler"]["ms_per_step"], found[f"{d} dpm++2m"]["ms_per_step"]
        lines.append(f"| {d} | {euler:.1f} | {dpm:.1f} | {cached} | {loop} |")
    return lines


def render(folder: Path) -> str:
    suite, compiled = _load(folder, "suite.json"), _later_parts(folder)
    if not suite:
        raise SystemExit(f"error: {folder / 'suite.json'} not found: give the folder gpu_run.sh wrote")
    head = (
        f"Device: {suite['device']}, torch {suite['versions']['torch']}, triton {suite['versions']['triton']}, "
        f"{suite['date']}" + (" (CPU REHEARSAL: not GPU figures)" if suite.get("rehearse") else "")
    )
    parts = [
        [head],
        ladder(suite, compiled),
        edits(suite),
        fewer_calls(suite),
        goals_table(suite, compiled),
        profile(suite),
        kernels(_load(folder, "kernels.json")),
    ]
    return "\n\n".join("\n".join(p) for p in parts if p) + "\n"


def redraw(folder: Path) -> Path:
    """suite-ladder.png from suite.json, suite-torchao.json and suite-compile.json, as gpu_suite draws it."""
    import suite_parts

    suite, compiled = _load(folder, "suite.json"), _later_parts(folder)
    rungs = {**suite.get("ladder", {}), **compiled.get("ladder", {})}
    labels = [r for r in ordered(rungs) if "kontext" in rungs[r]]
    base = suite.get("diffusers", {}).get("kontext", {}).get("ms_per_step")
    path = folder / "suite-ladder.png"
    suite_parts.write_png(path, labels, [rungs[r]["kontext"]["ms_per_step"] for r in labels], base)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--rungs"]:
        print("\n".join(rungs_table()))
        return 0
    png = "--png" in argv
    argv = [a for a in argv if a != "--png"]
    if len(argv) != 1:
        print("usage: python benchmarks/gpu/ladder_table.py RESULTS_FOLDER [--png] | --rungs", file=sys.stderr)
        return 2
    print(render(Path(argv[0])), end="")
    if png:
        print(f"wrote {redraw(Path(argv[0]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
