"""Results, one folder per run: benchmarks/results/<device>-<what>-<date or commit>/ holds a run's files and its
manifest.json, which says what produced them:

    what       the measurement, in a line
    command    the command that ran (a list, in order, when the folder holds several commands' files)
    when       when it ran (UTC)
    commit     the commit it ran at (null when not recorded), dirty: whether the tree had changes
    machine    the machine it ran on
    files      the run's files in this folder

A script that writes results defaults to a new run folder (default_path) and, once its files are written, calls
record(): a file under benchmarks/results/ gets its folder's manifest; one straight in results/ is refused before
the run (check_out). A GPU run's files come back from the device without one (only 8 files come back); after
copying them into a run folder:

    python benchmarks/run_folder.py gpu-run benchmarks/results/<device>-<date>/   # its manifest, from run.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
MANIFEST = "manifest.json"


def write_json(path: Path, data: dict) -> None:
    """Replace `path` by `data` as JSON in one rename: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def default_path(device: str, what: str, filename: str, stamp: str | None = None) -> Path:
    """results/<device>-<what>-<stamp>/<filename>, stamp today's date (UTC) unless given."""
    stamp = stamp or datetime.datetime.now(datetime.UTC).date().isoformat()
    return RESULTS / "-".join(slug(x) for x in (device, what, stamp)) / filename


def in_results(path: Path) -> bool:
    return Path(path).resolve().is_relative_to(RESULTS.resolve())


def check_out(path: Path) -> Path:
    """Refuse, before anything runs, a results file straight in benchmarks/results/: it belongs to a run folder."""
    if Path(path).resolve().parent == RESULTS.resolve():
        raise SystemExit(
            f"error: {path} is straight in benchmarks/results/; write into a run folder, "
            "benchmarks/results/<device>-<what>-<date or commit>/ (or leave --out out for a new one)"
        )
    return path


def git_state(root: Path = ROOT) -> dict:
    """{"commit": HEAD, "dirty": tracked files changed} of the tree, or nulls where git cannot say."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode or status.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def command(script: str, args: list[str] | None = None) -> str:
    """The command as typed in the repository's root: python <script> <args> (this process's, unless given)."""
    path = Path(script).resolve()
    shown = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(script)
    return shlex.join(["python", shown, *(sys.argv[1:] if args is None else args)])


def host(**more) -> dict:
    """The machine: CPU model and count, platform, Python; `more` adds what the caller knows (device, torch, ...)."""
    cpu = platform.processor() or None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **more,
    }


def write_manifest(folder: Path, what: str, command, when: str, commit, dirty, machine: dict, **more) -> dict:
    """folder/manifest.json; `files` lists the folder's other files (`more` adds keys, such as how it was made)."""
    files = sorted(p.name for p in Path(folder).iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"what": what, "command": command, "when": when, "commit": commit, "dirty": dirty}
    manifest |= {"machine": machine, "files": files, **more}
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def record(path: Path, what: str, machine: dict, when: str, script: str, args: list[str] | None = None):
    """After `script` (run with `args`, default this process's) wrote `path`: when it lies under benchmarks/results/,
    its run folder's manifest (the command, `when` it started, the tree's commit). Elsewhere nothing; returns the
    manifest or None."""
    path = Path(path).resolve()
    if not in_results(path):
        return None
    check_out(path)
    state = git_state()
    return write_manifest(path.parent, what, command(script, args), when, state["commit"], state["dirty"], machine)


# ---- a GPU run's folder -------------------------------------------------------------------------------------------


def _gpu_command(run: dict) -> str:
    """The command a run.json records, or the one its phases imply (the phases --only left out say "--only")."""
    if run.get("command"):
        return run["command"]
    args = ["--rehearse"] if run.get("mode") == "rehearse" else []
    phases = run.get("phases", {})
    if any("--only" in p.get("reason", "") for p in phases.values()):
        chosen = [n for n, p in phases.items() if n not in ("install", "env") and "--only" not in p.get("reason", "")]
        args += ["--only", ",".join(chosen)]
    return shlex.join(["bash", "benchmarks/gpu_run.sh", *args])


def gpu_manifest(folder: Path, commit: str | None = None, **more) -> dict:
    """The manifest of a GPU run's folder from its run*.json (one per command, run.json first): their commands, the
    first one's start, the commit they recorded (or `commit`), the GPU and versions the env phase found."""
    runs = sorted(Path(folder).glob("run*.json"), key=lambda p: (p.name != "run.json", p.name))
    if not runs:
        raise SystemExit(f"error: no run.json in {folder}: give the folder a GPU run's files were copied into")
    data = [json.loads(p.read_text()) for p in runs]
    commands = [_gpu_command(d) for d in data]
    recorded = next((d["commit"] for d in data if d.get("commit")), None)
    env = data[0].get("env", {})
    smi = env.get("nvidia_smi")
    gpu = smi[0] if isinstance(smi, list) and smi else {}
    machine = {
        "gpu": gpu.get("name") or env.get("torch", {}).get("device"),
        "driver": gpu.get("driver_version"),
        "gpu_memory": gpu.get("memory.total"),
        "cuda": env.get("torch", {}).get("cuda_build"),
        "python": env.get("python"),
        "packages": env.get("packages"),
    }
    return write_manifest(
        folder,
        "every GPU figure of one GPU session: bash benchmarks/gpu_run.sh (benchmarks/machine/gpu_run.py)",
        commands[0] if len(commands) == 1 else commands,
        data[0].get("started_utc"),
        recorded or commit,
        data[0].get("dirty"),
        machine,
        **more,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Results' run folders: write a GPU run folder's manifest.json")
    sub = p.add_subparsers(dest="what", required=True)
    gpu = sub.add_parser("gpu-run", help="a folder holding the files one or more gpu_run.sh commands brought back")
    gpu.add_argument("folder", type=Path)
    gpu.add_argument("--commit", help="the commit it ran at, where run.json does not record one")
    args = p.parse_args(argv)
    manifest = gpu_manifest(args.folder, args.commit)
    print(json.dumps(manifest, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
