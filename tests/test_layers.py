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
