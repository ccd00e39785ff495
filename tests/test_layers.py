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


def mentions(path: Path, package: str) -> list[str]:
    """Every import of package in a file, and every string constant naming it (importlib.import_module("...")),
    anywhere in the file; docstrings are not code and are left out."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == package]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            found.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value.split(".")[0].split(":")[0] == package:
                found.append(repr(node.value))
    return found


def runtime_files() -> list[Path]:
    """kontext_rt's own files: runtime/kontext_rt/ and the kernels/ and export/ folders linked into it."""
    package = ROOT / "runtime" / "kontext_rt"
    files = [p for p in package.rglob("*.py") if not {"kernels", "export"} & set(p.relative_to(package).parts)]
    return files + sorted((ROOT / "kernels").rglob("*.py")) + sorted((ROOT / "export").rglob("*.py"))


def test_the_runtime_never_imports_the_small_model():
    """kontext_toy (the small Kontext, its task and commands) uses kontext_rt, never the other way round: the CLI
    finds its commands through entry points."""
    files = runtime_files()
    assert len(files) > 40
    found = {f"{path.relative_to(ROOT)}: {name}" for path in files for name in mentions(path, "kontext_toy")}
    assert not found, sorted(found)


# What the doors (the CLI and the server) may import: the package's exports (kontext_rt: Pipeline, Request,
# RunReport, LoadSpec, Optimizations, the errors, the configs) and the public modules the docs name, the export
# stage (kontext_rt.export, docs/export.md), and each other. Never the model, kernels, sampling, backends,
# weights' internals, text encoders or the VAE stage: what a door needs of them goes through the public API.
PUBLIC = (
    "kontext_rt.errors",
    "kontext_rt.options",
    "kontext_rt.placement",
    "kontext_rt.image",
    "kontext_rt.arguments",
    "kontext_rt.memory",
    "kontext_rt.load_spec",
    "kontext_rt.load_checks",
    "kontext_rt.config",
    "kontext_rt.weights.formats",
    "kontext_rt.export",
)
DOORS = ("kontext_rt.cli", "kontext_rt.cli_args", "kontext_rt.cli_prepare", "kontext_rt.cli_serve", "kontext_rt.serve")


def door_files() -> list[Path]:
    package = ROOT / "runtime" / "kontext_rt"
    return sorted(package.glob("cli*.py")) + sorted((package / "serve").glob("*.py"))


def test_the_cli_and_the_server_use_only_the_public_api():
    files = door_files()
    assert len(files) >= 8
    inside = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in project_imports(path)
        if name != "kontext_rt" and not allowed(name, PUBLIC + DOORS)
    }
    assert not inside, sorted(inside)


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


# ---- benchmarks and tests --------------------------------------------------------------------------------------------

BENCH, TESTS = ROOT / "benchmarks", ROOT / "tests"


def module_names(folder: Path) -> set[str]:
    """The plain names a folder's modules are imported by when the folder is on sys.path."""
    return {p.stem for p in folder.rglob("*.py") if p.stem not in ("conftest", "__init__")}


IMPORTERS = ("import_module", "__import__", "find_spec")  # calls that import the module a string names


def crossings(path: Path, package: str, plain: set[str]) -> list[str]:
    """Every import in a file of package (`package`, `package.x`) or of one of its modules by plain name, anywhere in
    the file: import statements, and a string handed to importlib (`importlib.import_module("package.x")`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in IMPORTERS and node.args:
            first = node.args[0]
            names = [first.value] if isinstance(first, ast.Constant) and isinstance(first.value, str) else []
        else:
            continue
        found += [n for n in names if n.split(".")[0] in (package, *plain)]
    return found


def test_benchmarks_and_tests_never_import_each_other():
    """The rule: no file under benchmarks/ imports tests (`tests`, `tests.*`, or a test module by plain name), and no
    file under tests/ imports a benchmark (`benchmarks`, `benchmarks.*`, or a benchmark module by plain name). What
    both need lives in the packages (kontext_toy.checkpoints builds the benchmarks' small checkpoints). A test reaches
    a benchmark script only by its file (tests/bench_scripts.py): run as a subprocess, or loaded to test its logic;
    that is testing the script, not sharing code with it."""
    bench_files, test_files = sorted(BENCH.rglob("*.py")), sorted(TESTS.rglob("*.py"))
    assert len(bench_files) > 15 and len(test_files) > 40
    found = [
        f"{path.relative_to(ROOT)}: {name}"
        for files, package, plain in (
            (bench_files, "tests", module_names(TESTS)),
            (test_files, "benchmarks", module_names(BENCH)),
        )
        for path in files
        for name in crossings(path, package, plain)
    ]
    assert not found, found
