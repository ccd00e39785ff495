"""The tree stays as ruff checks and formats it (pyproject.toml's [tool.ruff]): lint clean, formatted."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (it comes with the dev extra: pip install -e '.[dev]')")
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(command):
    run = subprocess.run([RUFF, *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"ruff {' '.join(command)} found:\n{run.stdout}{run.stderr}"


def test_isort_knows_every_benchmark_module():
    """benchmarks' scripts import each other by plain name; ruff sorts those imports as local only when
    pyproject.toml lists them (known-local-folder): the list is every module under benchmarks/, no more."""
    import tomllib

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]["isort"]
    modules = {p.stem for p in (ROOT / "benchmarks").rglob("*.py") if p.stem != "conftest"}
    assert set(listed["known-local-folder"]) == modules
