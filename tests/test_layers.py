"""The lower layers import nothing above them: the kernels know only themselves; the model knows the kernels, the
configs and the errors; the sampler knows the model too. Every import counts, a function's lazy one included."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = ("kontext_rt.config", "kontext_rt.errors")
LAYERS = {  # folder -> the kontext_rt modules its files may import
    ROOT / "kernels": ("kontext_rt.kernels",),
    ROOT / "runtime" / "kontext_rt" / "model": ("kontext_rt.model", "kontext_rt.kernels", *BASE),
    ROOT / "runtime" / "kontext_rt" / "sampling": (
        "kontext_rt.sampling",
        "kontext_rt.model",
        "kontext_rt.kernels",
        *BASE,
    ),
}


def project_imports(path: Path) -> list[str]:
    """Every kontext_rt module a file imports (from-imports name their module), anywhere in the file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return [n for n in names if n == "kontext_rt" or n.startswith("kontext_rt.")]


def allowed(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("folder", list(LAYERS), ids=lambda f: f.name)
def test_a_layer_imports_nothing_above_it(folder):
    files = sorted(folder.glob("*.py"))
    assert files, folder
    above = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in project_imports(path)
        if not allowed(name, LAYERS[folder])
    }
    assert not above, sorted(above)
