"""The wheels a GPU machine installs offline: `bash benchmarks/gpu_wheels.sh` makes them here, gpu_run.py installs
them there (no network on the GPU machines, so what the image lacks travels with the working tree).

wheels/manifest.json records a digest of the sources the project's wheel was built from, so a wheel older than the
tree is never measured by mistake: gpu_run.py rebuilds from the tree instead (setuptools is in the image) and says so.
It records the commit too (the GPU machine gets the tree without its git history): run.json names it.

    python benchmarks/machine/wheels.py manifest wheels   # after the downloads and the build (gpu_wheels.sh does it)
    python benchmarks/machine/wheels.py repack WHEEL      # LZMA for its big members: a large wheel fits the carry
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file: benchmarks/machine/wheels.py)
sys.path.insert(0, str(ROOT / "benchmarks"))  # the results' git_state, by plain name
from run_folder import git_state  # noqa: E402

SOURCES = ("runtime", "kernels", "export", "pyproject.toml")  # what goes into the project's wheel
PROJECT = "kontext-rt"


def built_here(path: Path) -> bool:
    """What an install or a run writes beside the sources (never carried to the GPU machine, which is why it must
    not count): byte code, and the egg-info setuptools writes into runtime/, the source root."""
    return path.suffix == ".pyc" or any(part == "__pycache__" or part.endswith(".egg-info") for part in path.parts)


def source_digest(root: Path = ROOT) -> str:
    """sha256 over the package's source files (relative path and bytes, in path order). The links that join
    kernels/ and export/ to the package are not followed (rglob does not): both folders are hashed as themselves."""
    h = hashlib.sha256()
    for top in SOURCES:
        path = root / top
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            if built_here(f.relative_to(root)):
                continue
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def dist_name(wheel: Path) -> str:
    """The normalized distribution name of a wheel file (PEP 503: lower case, runs of -_. as one -)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def write_manifest(folder: Path, root: Path = ROOT) -> dict:
    wheels = sorted(p.name for p in folder.glob("*.whl"))
    if not any(dist_name(Path(w)) == PROJECT for w in wheels):
        raise SystemExit(f"error: no {PROJECT} wheel in {folder}: build it first (pip wheel --no-deps .)")
    manifest = {"source_digest": source_digest(root), "wheels": wheels, "made": datetime.date.today().isoformat()}
    manifest |= git_state(root)  # commit, dirty
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def plan(folder: Path, installed: Callable[[str], bool], root: Path = ROOT) -> dict:
    """What to install from `folder`: every wheel whose distribution `installed` says is absent, the project's own
    wheel always (unless stale: then `stale` is True and the caller builds from the tree)."""
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{manifest_file} is missing: make {folder} with `bash benchmarks/gpu_wheels.sh`")
    manifest = json.loads(manifest_file.read_text())
    install, present = [], []
    stale = manifest["source_digest"] != source_digest(root)
    for name in manifest["wheels"]:
        wheel = folder / name
        if not wheel.is_file():
            raise FileNotFoundError(f"{wheel} is listed in {manifest_file} but missing: run gpu_wheels.sh again")
        dist = dist_name(wheel)
        if dist == PROJECT:
            if not stale:
                install.append(wheel)
        elif installed(dist):
            present.append(dist)
        else:
            install.append(wheel)
    built_at = {"commit": manifest.get("commit"), "dirty": manifest.get("dirty")}  # older manifests: unknown
    return {"install": install, "already_installed": present, "project_wheel_stale": stale, "built_at": built_at}


def repack(wheel: Path, min_bytes: int = 1 << 20) -> tuple[int, int]:
    """Rewrite `wheel` in place with LZMA for its members of min_bytes or more (deflate for the rest): (bytes before,
    after). For the carry's 64 MiB: FlashAttention-3's wheel is 62.8 MB deflated, its one CUDA library about 29 MB
    under LZMA. The members and their bytes stay the same, so RECORD's hashes still hold; a wheel is a zip file,
    and pip reads it with zipfile, which reads LZMA members (CPython's lzma module)."""
    import zipfile

    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".repacking")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w") as dst:
        for info in src.infolist():
            data = src.read(info)  # before compress_type changes: it says how to read the member
            info.compress_type = zipfile.ZIP_LZMA if info.file_size >= min_bytes else zipfile.ZIP_DEFLATED
            dst.writestr(info, data)
    tmp.replace(wheel)
    return before, wheel.stat().st_size


USAGE = """usage: python benchmarks/machine/wheels.py manifest WHEELS_DIR
       python benchmarks/machine/wheels.py repack WHEEL..."""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "manifest":
        manifest = write_manifest(Path(argv[1]))
        print(f"{len(manifest['wheels'])} wheels, sources {manifest['source_digest'][:12]}")
        return 0
    if len(argv) >= 2 and argv[0] == "repack":
        for name in argv[1:]:
            before, after = repack(Path(name))
            print(f"{Path(name).name}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB (LZMA)")
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
