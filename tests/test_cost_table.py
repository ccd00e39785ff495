"""The cost table of fewer model calls (benchmarks/quality/cost_table.py): the docs show the committed record's rows
verbatim (the README three of them), the fast choice follows the goal's definition, and a small run measures what
each row says (its calls, and latents handed on where the setting keeps them)."""

from __future__ import annotations

import json
from pathlib import Path

from tests import bench_scripts

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "runtime" / "kontext_toy" / "records" / "small-kontext-cost-table.json"
CHART = ROOT / "docs" / "images" / "quality-vs-calls.png"


def cost_table():
    return bench_scripts.load("quality/cost_table.py")


def test_the_docs_show_the_committed_table_and_the_readme_three_of_its_rows():
    record = json.loads(RECORD.read_text())
    rows = [line for line in cost_table().render(record).splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(cost_table().SETTINGS)  # the header, a row per setting
    page = (ROOT / "docs" / "quality.md").read_text()
    assert not [row for row in rows if row not in page]
    assert f"fast choice: **{record['fast']}**" in page
    readme = (ROOT / "README.md").read_text()
    front = [line for line in readme.splitlines() if line.startswith("| ") and line in rows[1:]]
    assert len(front) == 3, front
    assert "docs/images/quality-vs-calls.png" in readme and CHART.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert record["command"].startswith("python benchmarks/quality/cost_table.py --out ")
    # the record is the script's: each row counts what it ran, and only the latents-kept row took kept latents
    reused = {r["setting"]: r["reused_latents"] for r in record["rows"]}
    assert reused.pop("Euler 28, latents kept") > 0 and set(reused.values()) == {0}


def _row(name, calls, success, kept, vs):
    return {
        "setting": name,
        "model_calls": calls,
        "edit_success_rate": success,
        "preservation_psnr": kept,
        "output_psnr_vs_reference": vs,
    }


def test_the_fast_choice_is_the_goals():
    """At most 10 calls, success within 3 points and kept PSNR within 1 dB of the reference's; then the nearest."""
    ct = cost_table()
    ref = _row("ref", 28, 0.76, 26.0, 100.0)
    rows = [
        ref,
        _row("too many calls", 10.5, 0.76, 26.0, 80.0),
        _row("worse edits", 8, 0.72, 26.0, 70.0),
        _row("worse kept", 8, 0.76, 24.9, 70.0),
        _row("far", 4, 0.73, 25.1, 40.0),
        _row("near", 10, 0.80, 27.0, 45.0),
    ]
    assert ct.fast_choice(rows) == "near"
    assert ct.fast_choice(rows[:5]) == "far"
    assert ct.fast_choice(rows[:4]) is None


def test_a_small_run_counts_calls_and_hands_latents_on():
    ct = cost_table()
    settings = (
        ct.Setting("Euler 3", "euler", 3),
        ct.Setting("Euler 3, step cache", "step cache", 3, {"step_cache": 1e9}),
        ct.Setting("Euler 3, latents kept", "latents kept", 3, {"reuse_latents": True}),
    )
    record = ct.measure(settings, n=1, drift_turns=2, progress=lambda line: None)
    plain, cached, kept = record["rows"]
    assert plain["model_calls"] == 3 and cached["model_calls"] == 1  # a huge threshold: the first step in full
    # the one sample is a recolour: its edit, then a session of 2 x (edit, undo), each after the first on an output
    assert kept["runs"] == plain["runs"] == 5
    assert (plain["reused_latents"], kept["reused_latents"]) == (0, 3)
    assert kept["output_psnr_vs_reference"] == 100.0  # the sample's own edit is untouched by the option
    assert kept["drift_psnr"] != plain["drift_psnr"]
    table = ct.render(record)
    assert table.count("\n| Euler 3") == 3 and "identical" in table
