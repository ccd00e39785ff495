"""The lower layers import nothing above them: the kernels know only themselves; the model knows the kernels, the
configs and the errors; the sampler knows the model too; the placement setting knows only the errors, and the host
streaming beneath it nothing of the package. Every import counts, a function's lazy one included. And no two
modules import each other when they are imported (a function's lazy import may close a loop: the CLI's do)."""

import ast
import os
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
    ROOT / "runtime" / "kontext_rt" / "placement.py": ("kontext_rt.errors",),
    ROOT / "runtime" / "kontext_rt" / "streaming.py": (),
}
PACKAGE = ROOT / "runtime" / "kontext_rt"  # kernels/ and export/ are linked in as kontext_rt.kernels, .export


def project_imports(path: Path, module_level: bool = False) -> list[str]:
    """Every kontext_rt module a file imports (from-imports name their module), anywhere in the file or, with
    module_level, in the statements run when it is imported (those of `if TYPE_CHECKING:` and functions excluded)."""
    tree = ast.parse(path.read_text(), str(path))
    names = []
    for node in tree.body if module_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return [n for n in names if n == "kontext_rt" or n.startswith("kontext_rt.")]


def allowed(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("folder", list(LAYERS), ids=lambda f: f.name)
def test_a_layer_imports_nothing_above_it(folder):
    files = [folder] if folder.is_file() else sorted(folder.glob("*.py"))
    assert files, folder
    above = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in project_imports(path)
        if not allowed(name, LAYERS[folder])
    }
    assert not above, sorted(above)


def module_graph() -> dict[str, set[str]]:
    """kontext_rt module -> the kontext_rt modules it imports at module level (`from pkg import submodule` counts
    as the submodule; a package's __init__ is the package)."""
    files = {}
    for folder, _, names in os.walk(PACKAGE, followlinks=True):  # through the kernels/ and export/ links
        for path in (Path(folder) / n for n in names if n.endswith(".py")):
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def module_of(name: str) -> str:
        while name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("kontext_rt")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kontext_rt"):
                targets |= {f"{node.module}.{a.name}" for a in node.names}
        graph[module] = {module_of(t) for t in targets} - {module}
    return graph


def test_no_import_cycles_at_module_level():
    graph = module_graph()
    assert {"kontext_rt.placement", "kontext_rt.model.transformer", "kontext_rt.export.stages"} <= set(graph)
    cycles, done = [], set()

    def visit(module, path):
        if module in path:
            cycles.append(" -> ".join([*path[path.index(module) :], module]))
            return
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, cycles
