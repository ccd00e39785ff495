"""The benchmark scripts as the tests reach them: by file path. benchmarks/ is not a package, and no test imports
it as one (tests/test_layers.py): a test runs a script as a subprocess, or loads it here to test its logic. A
script loaded here is the code under test, never a helper shared with the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def path(relative: str) -> Path:
    """benchmarks/<relative>, which must exist (a moved script fails here, by name, not in a subprocess)."""
    file = BENCH / relative
    if not file.is_file():
        raise FileNotFoundError(f"no benchmark script {file}")
    return file


def load(relative: str) -> ModuleType:
    """The script benchmarks/<relative> as a module named after its file, as when it runs: it puts the folders of
    the modules it imports by plain name on sys.path itself. Loaded once; a second call returns the same module."""
    file = path(relative)
    module = sys.modules.get(file.stem)
    if module is not None and Path(getattr(module, "__file__", "") or "").resolve() == file.resolve():
        return module
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module  # its siblings import it by this name (ladder_table -> gpu_suite, ...)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[file.stem]
        raise
    return module
