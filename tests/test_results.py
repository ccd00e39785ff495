"""benchmarks/results/ keeps one folder per run, each with the manifest.json that says what produced it (the command),
when, at which commit, on which machine; every results path the documentation cites exists; and the scripts' run
folders (benchmarks/run_folder.py) are written that way."""

import json
import re
from pathlib import Path

import pytest

from tests import bench_scripts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = bench_scripts.BENCH / "results"
KEYS = ("what", "command", "when", "commit", "dirty", "machine", "files")


def test_every_result_is_in_a_run_folder_with_its_manifest():
    assert not [p.name for p in RESULTS.iterdir() if p.is_file()], "a loose file in benchmarks/results/"
    folders = sorted(p for p in RESULTS.iterdir() if p.is_dir())
    assert len(folders) >= 7
    for folder in folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        assert list(manifest)[: len(KEYS)] == list(KEYS), folder.name
        assert manifest["files"] == sorted(p.name for p in folder.iterdir() if p.name != "manifest.json"), folder.name
        commands = manifest["command"] if isinstance(manifest["command"], list) else [manifest["command"]]
        assert commands and all(re.match(r"(python|bash) benchmarks/", c) for c in commands), folder.name
        assert re.match(r"\d{4}-\d{2}-\d{2}", manifest["when"]), folder.name
        assert manifest["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", manifest["commit"]), folder.name
        assert manifest["machine"] and manifest["what"], folder.name


def cited() -> set[str]:
    """Every benchmarks/results/... path the pages and the code's comments name (placeholders like <device> aside)."""
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "runtime").rglob("*.md")]
    files += [*(ROOT / "runtime").rglob("*.py"), *(ROOT / "kernels").glob("*.py"), *(ROOT / "export").glob("*.py")]
    found = set()
    for path in files:
        for match in re.findall(r"benchmarks/results/[^\s`)\"']*", path.read_text()):
            if not re.search(r"<|\.\.\.", match):
                found.add(match.rstrip("./"))
    return found


def test_the_results_the_docs_cite_exist():
    paths = cited()
    assert "benchmarks/results/h200-2026-11-28-8fc0047" in paths and len(paths) >= 5
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


@pytest.fixture
def run_folder(tmp_path, monkeypatch):
    module = bench_scripts.load("run_folder.py")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    return module


def test_a_script_writing_into_a_run_folder_leaves_its_manifest(run_folder, tmp_path):
    out = run_folder.default_path("NVIDIA H200", "kernels", "kernels.json", "2026-12-01")
    assert out.relative_to(run_folder.RESULTS).parts == ("nvidia-h200-kernels-2026-12-01", "kernels.json")
    out.parent.mkdir(parents=True)
    out.write_text("{}")
    script = bench_scripts.path("kernels/kernels_gpu.py")
    manifest = run_folder.record(out, "kernels", {"device": "x"}, "2026-12-01T00:00:00+00:00", script, ["--reps", "3"])
    assert manifest == json.loads((out.parent / "manifest.json").read_text())
    assert manifest["command"] == "python benchmarks/kernels/kernels_gpu.py --reps 3"
    assert manifest["files"] == ["kernels.json"] and re.fullmatch(r"[0-9a-f]{40}", manifest["commit"])
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("{}")
    assert run_folder.record(elsewhere, "x", {}, "2026-12-01", script) is None  # outside results/: nothing
    with pytest.raises(SystemExit, match="run folder"):
        run_folder.check_out(run_folder.RESULTS / "loose.json")
