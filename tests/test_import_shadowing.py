"""The repository's root on sys.path must not shadow an installed package.

`python -m pytest`, `python -c` and an interactive Python started in the root put the root first on sys.path, so
any top-level folder with an `__init__.py` (or a top-level `*.py`) is imported under its folder's name before the
installed package of that name. kernels/ did exactly that to Hugging Face's `kernels` (a dependency of
transformers >= 5.25), and every diffusers import failed. The design that prevents it: the source folders
(runtime/, kernels/, export/) and the script folder (benchmarks/) have no `__init__.py`, so from the
root each is at most a namespace portion, which any installed module or regular package of that name beats; the
package is imported only as `kontext_rt` (runtime/ is its source root). tests/ is the one regular package at the
top (test modules share helpers as `tests.*`); no distribution on the package index is called `tests`, and the
first test below names it the day an installed one claims it.
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the only top-level folder allowed to be a regular package (see the module docstring)
REGULAR_PACKAGES = {"tests"}


def importable_names() -> dict[str, Path]:
    """Every name the root offers to `import`: its folders and its *.py files, as Python's path finder sees them."""
    names = {}
    for path in ROOT.iterdir():
        name = path.stem if path.suffix == ".py" else path.name
        if name.isidentifier() and (path.is_dir() or path.suffix == ".py"):
            names[name] = path
    return names


def where_from_root(name: str) -> list[str]:
    """Where `import name` finds it in a Python started in the root (`python -c` puts the root first on sys.path).

    find_spec, not import: the installed package is located without running its code."""
    code = (
        "import importlib.util, os, sys\n"
        "assert os.path.abspath(sys.path[0]) == os.getcwd(), sys.path[:2]\n"  # the root first, as -c puts it
        f"spec = importlib.util.find_spec({name!r})\n"
        "print('\\n'.join([spec.origin] if spec.origin else list(spec.submodule_search_locations)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # it would leave the root off sys.path
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_no_top_level_name_shadows_an_installed_distribution():
    """Each installed import name that is also a top-level name here resolves, from the root, outside the tree."""
    installed = importlib.metadata.packages_distributions()  # import name -> distributions providing it
    ours = importable_names()
    shadowed = {}
    for name in sorted(set(ours) & set(installed)):
        # the tree's own folder or file (a virtual environment inside the root is not the tree)
        found = [p for p in where_from_root(name) if Path(p).resolve().is_relative_to(ours[name].resolve())]
        if found:
            shadowed[name] = (installed[name], found)
    assert not shadowed, f"from the repository root these names import this tree, not the installed package: {shadowed}"


def test_top_level_folders_are_not_regular_packages():
    """The design itself, for names no distribution installed here claims today (`runtime` and `export` are both
    on the package index): no top-level *.py, and no top-level folder but tests/ with an __init__.py."""
    offenders = sorted(
        name
        for name, path in importable_names().items()
        if path.suffix == ".py" or ((path / "__init__.py").exists() and name not in REGULAR_PACKAGES)
    )
    assert not offenders, f"importable from the repository root under their own names: {offenders}"


def test_the_package_imports_from_its_install_not_from_the_root():
    """kontext_rt and its kernels/export parts come from the install, even in a Python started in the root: from
    runtime/kontext_rt/ (an editable install) or from site-packages, never from the top-level folders."""
    tails = {
        "kontext_rt": ("kontext_rt", "__init__.py"),
        "kontext_rt.kernels.rope_attention": ("kontext_rt", "kernels", "rope_attention.py"),
        "kontext_rt.export.specs": ("kontext_rt", "export", "specs.py"),
    }
    for name, tail in tails.items():
        (origin,) = where_from_root(name)
        path = Path(origin)
        assert path.parts[-len(tail) :] == tail, (name, origin)
        assert not path.is_relative_to(ROOT) or path.is_relative_to(ROOT / "runtime" / "kontext_rt"), (name, origin)


def test_the_package_and_the_cli_parser_import_no_torch():
    """`import kontext_rt` exports lazily, so `kontext-rt --help` and `--version` answer without importing torch
    (about 1 s here); the names still resolve on first use."""
    code = (
        "import sys, kontext_rt\n"
        "from kontext_rt.cli import build_parser\n"
        "build_parser()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "values = {name: getattr(kontext_rt, name) for name in kontext_rt.__all__}\n"  # each resolves
        "assert all(name.isupper() or value.__name__ == name for name, value in values.items())\n"
        "assert 'torch' in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
