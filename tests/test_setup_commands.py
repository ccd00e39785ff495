"""README == CI: the README's set-up commands are the ones .ci/run runs, and the lock they install from covers
every dependency pyproject names while leaving torch and triton to the machine (a GPU machine's CUDA build)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNLOCKED = {"torch", "triton"}  # the machine's own: the CPU wheel here, a CUDA build (and its triton) on a GPU


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def readme_setup_commands() -> list[str]:
    """The commands of the first code block under the README's "Set up" heading."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Set up") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def ci_readme_commands() -> list[str]:
    """The line after each `# --- README: ... ---` marker in .ci/run, in order."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [lines[i + 1].strip() for i, line in enumerate(lines) if re.match(r"\s*# --- README: \w+ ---", line)]


def test_ci_runs_exactly_the_readme_commands():
    readme, ci = readme_setup_commands(), ci_readme_commands()
    assert len(readme) == 2 and readme == ci, f"README: {readme}\n.ci/run: {ci}"
    assert "-c constraints.txt" in readme[0], "the README's install uses the lock"


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[\w.+!-]+", version), f"constraints.txt: not name==version: {line!r}"
            pins[normalized(name)] = version
    return pins


def declared_dependencies() -> set[str]:
    """Every distribution pyproject asks for, in its dependencies and in every extra but `ray` (never in dev)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {k: v for k, v in project["optional-dependencies"].items() if k != "ray"}
    requirements = project["dependencies"] + [r for reqs in extras.values() for r in reqs]
    names = {normalized(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}
    return names - {normalized(project["name"])}


def test_the_lock_pins_every_declared_dependency_but_the_machines_torch():
    pins = lock()
    assert not UNLOCKED & set(pins), "torch and triton stay the machine's own (a CUDA build on a GPU machine)"
    missing = sorted(declared_dependencies() - UNLOCKED - set(pins))
    assert not missing, f"pyproject asks for {missing}, which constraints.txt does not lock"
