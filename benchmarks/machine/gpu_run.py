"""The one command a GPU machine runs: every GPU figure of the project in one call, each phase under its deadline.

    bash benchmarks/gpu_run.sh [--out DIR]              # on the GPU machine; DIR defaults to $OUT
    bash benchmarks/gpu_run.sh --rehearse --out DIR     # the same control flow on a CPU machine (CI runs it)

A GPU is lent rarely, for 15 minutes with its start, 10 minutes per command, no network; only the files under $OUT
come back (at most 8). So the run is prepared and rehearsed on a CPU, and on the GPU it ends within BUDGET_S, its
core inside the first CORE_END_S so a failed run leaves time to rerun. Phases, each a child process under its own
deadline (a kill at the deadline keeps whatever the child had already written):

    install   the carried wheels (wheels/, from `bash benchmarks/gpu_wheels.sh`) into a fresh folder, offline;
              without wheels/, the installed kontext_rt (CI, a developer's environment)
    env       GPU, driver, CUDA, packages, and what imports (machine/gpu_env.py)
    suite     gpu/gpu_suite.py --part core: the bf16 ladder, the diffusers baseline, the exactness checks, the
              end-to-end edits and FP8; must end by CORE_END_S
    kernels   kernels/kernels_gpu.py: the Triton kernels at FLUX shapes against SDPA
    tensorrt  gpu/tensorrt_gpu.py: whether TensorRT imports here, and engines if it does
    memory    gpu/memory_gpu.py: peak memory and ms/step of the full-size loop per placement x precision, beside
              the plan
    parallel  gpu/sp_gpu.py: Ulysses sequence parallelism over this machine's GPUs, ms/step on 2, 4, 8 of them
              beside one (run.json's "parallel"); with one GPU it records that and ends at once
    torchao   opt-in (--only suite,torchao: beside the core in one command): gpu/gpu_suite.py --part torchao,
              torchao's float8 row-wise linears on a model of their own, timed as the fp8 rung (needs the torchao
              wheel, carried by gpu_wheels.sh)
    compile   gpu/gpu_suite.py --part compile: the inductor rung, last, with the time that is left
    train     opt-in (--only train), its own command: kontext_toy/training/train.py on the GPU for
              --train-minutes from the shipped small Kontext (kontext_toy.checkpoints.small_kontext), evaluated there;
              the checkpoint comes back as small-kontext-gpu.tar.gz, with its train_log.json

Files in DIR: run.json (this record: the command, the commit (the carried wheel's, else the tree's), every phase's
status, exit code, time and output tail; the environment),
run.log (all output), suite.json, suite-compile.json, suite-ladder.png, kernels.json, tensorrt.json, memory.json;
with --only ...,torchao: suite-torchao.json; with --only train: small-kontext-gpu.tar.gz and train_log.json.
run.json is rewritten after every phase. The exit status is 0 only when every phase succeeded.

--rehearse: the tiny model on the CPU with the Triton interpreter, an eager stand-in for graph capture and, where
the CPU's torch lacks row-wise FP8 scaling, a stand-in for it; the kernel script's --smoke mode. --break PHASE
fails a phase on purpose (SUITE:PHASE, e.g. suite:fp8 or compile:compile, fails one inside the suite) to check
that the others still run and are written; --only runs a subset (install and env always run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

HERE = Path(__file__).resolve().parent  # benchmarks/machine/
BENCH = HERE.parent
ROOT = BENCH.parent
sys.path[:0] = [str(HERE), str(BENCH)]  # the wheels, the phases and the results' writer, by plain name

import run_folder  # noqa: E402
import wheels  # noqa: E402
from phases import PhaseError, Record, add_break_option, say  # noqa: E402
from run_folder import write_json  # noqa: E402

BUDGET_S = 530  # the whole run: inside one 10-minute command, with a margin for the machine's file transfers
CORE_END_S = 300  # install + env + the suite's core end by then
REHEARSAL_SLACK = 3  # --rehearse: every deadline x3 (a slower CI machine; the interpreter's speed varies)
MAX_FILES = 8  # what the device tool brings back from $OUT
DEADLINES = {
    "install": 60,
    "env": 45,
    "kernels": 120,
    "tensorrt": 60,
    "memory": 150,
    "parallel": 150,
    "torchao": 150,
}  # seconds; suite and compile: see above; train: its minutes + TRAIN_OVERHEAD_S
SUITE = BENCH / "gpu" / "gpu_suite.py"
SCRIPTS = {  # phase -> the script it runs with --out FILE
    "kernels": BENCH / "kernels" / "kernels_gpu.py",
    "tensorrt": BENCH / "gpu" / "tensorrt_gpu.py",
    "memory": BENCH / "gpu" / "memory_gpu.py",
}
PHASES = ("install", "env", "suite", "kernels", "tensorrt", "memory", "parallel", "torchao", "compile", "train")
OPT_IN = ("torchao", "train")  # run only when --only names them
ALONE = ("train",)  # and these only alone, in a command of their own
TRAIN_OVERHEAD_S = 180  # the pool (100,000 edits drawn in 12 processes), the evaluation, the writes
# the GPU training run: from the shipped model, a batch 4x the CPU runs', a pool 5x (tens of thousands of steps)
TRAIN_ARGS = ["--batch", "128", "--pool", "100000", "--workers", "12", "--lr", "5e-4", "--edit-weight", "4"]
TRAIN_REHEARSAL_ARGS = ["--batch", "8", "--pool", "64", "--workers", "2", "--eval-n", "2", "--eval-steps", "2"]
MIN_COMPILE_S = 150  # below this the compile part (inductor on 2 block types x 2 layouts) is killed mid-way


def installed(dist: str) -> bool:
    try:
        distribution(dist)
    except PackageNotFoundError:
        return False
    return True


def run_child(cmd: list[str], timeout_s: float, env: dict, log, tag: str) -> dict:
    """Run cmd, echoing and logging its output line by line; kill its process group at timeout_s. Raises
    PhaseError on a non-zero exit or a timeout; returns the phase details otherwise."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    killed = threading.Event()

    def kill():
        killed.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(max(timeout_s, 0.0), kill)
    timer.start()
    tail = deque(maxlen=25)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log.write(f"[{tag}] {line}\n")
            log.flush()
            say(f"[{tag}] {line}")
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # this loop died: never leave a child holding the GPU
            kill()
            proc.wait()
    details = {
        "rc": rc,
        "timed_out": killed.is_set(),
        "timeout_s": round(timeout_s, 1),
        "child_s": round(time.perf_counter() - t0, 2),
        "tail": list(tail),
    }
    if killed.is_set():
        raise PhaseError(f"killed at its {timeout_s:.0f} s deadline (what it wrote before is kept)", details)
    if rc != 0:
        raise PhaseError(f"exit status {rc}: {next((x for x in reversed(tail) if x.strip()), '')}"[:500], details)
    return details


class Run:
    def __init__(self, args, t0: float):
        self.args = args
        self.out: Path = args.out
        self.env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if args.rehearse:
            self.env["TRITON_INTERPRET"] = "1"  # the children's kernels run in the interpreter
        self.env["PYTHONUNBUFFERED"] = "1"
        self.python = sys.executable
        mine = [b for b in args.broken if ":" not in b]
        self.forward = [b.split(":", 1) for b in args.broken if ":" in b]  # (suite|compile, phase)
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.data = {
            "mode": "rehearse" if args.rehearse else "gpu",
            "command": shlex.join(["bash", "benchmarks/gpu_run.sh", *args.argv]),
            **run_folder.git_state(ROOT),  # the tree's; the carried wheel's instead when that is what runs
            "started_utc": started,
            "budget_s": BUDGET_S,
            "core_end_s": CORE_END_S,
            "phases": {},
        }
        self.slack = REHEARSAL_SLACK if args.rehearse else 1
        self.data["deadline_scale"] = self.slack
        self.record = Record(self.out / "run.json", self.data, BUDGET_S * self.slack, "run", mine, t0=t0)
        self.log = (self.out / "run.log").open("w")
        self.site = None  # the wheels' install folder, when wheels/ was carried

    def child(self, tag, cmd, timeout_s):
        return run_child([self.python, *cmd], timeout_s, self.env, self.log, tag)

    def deadline(self, phase):
        return DEADLINES[phase] * self.slack

    def install(self):
        folder = self.args.wheels
        if not folder.is_dir():
            try:
                self.child("install", ["-c", "import kontext_rt"], self.deadline("install"))
            except PhaseError as err:
                raise PhaseError(
                    "kontext_rt does not import and no wheels/ was carried: run `bash "
                    'benchmarks/gpu_wheels.sh` and carry ["wheels"]',
                    err.details,
                ) from None
            return {"source": "the installed environment (no wheels/ folder)"}
        todo = wheels.plan(folder, installed)
        if not todo["project_wheel_stale"]:
            self.data |= todo["built_at"]
        self.site = tempfile.TemporaryDirectory(prefix="kontext-rt-site-")  # removed when the run ends
        site = Path(self.site.name)
        paths = [str(p) for p in todo["install"]]
        if todo["project_wheel_stale"]:
            say("[install] the carried kontext-rt wheel is older than the tree: building from the tree instead")
            paths.append(str(ROOT))
        pip = [
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-build-isolation",
            "--target",
            str(site),
            *paths,
        ]
        details = self.child("install", pip, self.deadline("install"))
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), self.env.get("PYTHONPATH")]))
        return {
            "site": str(site),
            "installed": [Path(p).name for p in todo["install"]]
            + ["kontext-rt built from the tree"] * todo["project_wheel_stale"],
            "already_installed": todo["already_installed"],
            "built_from_tree": todo["project_wheel_stale"],
            "child_s": details["child_s"],
        }

    def env_probe(self):
        details = self.child("env", [str(HERE / "gpu_env.py")], self.deadline("env"))
        try:
            self.data["env"] = json.loads(details.pop("tail")[-1])
        except (json.JSONDecodeError, IndexError):
            self.data["env"] = {"error": "gpu_env.py printed more than its JSON; see run.log"}
        return details

    def parallel(self):
        """gpu/sp_gpu.py: Ulysses sequence parallelism on this machine's GPUs (with one GPU, it records that)."""
        cmd = [str(BENCH / "gpu" / "sp_gpu.py"), *["--rehearse"] * self.args.rehearse]
        details = self.child("parallel", cmd, self.deadline("parallel"))
        try:
            self.data["parallel"] = json.loads(details.pop("tail")[-1])
        except (json.JSONDecodeError, IndexError):
            self.data["parallel"] = {"error": "sp_gpu.py printed more than its JSON; see run.log"}
        return details

    def suite(self, part, timeout_s):
        cmd = [
            str(SUITE),
            "--out",
            str(self.out),
            "--part",
            part,
            "--deadline-s",
            str(max(timeout_s - 15, 1)),
        ]
        cmd += ["--rehearse"] * self.args.rehearse
        tag = "suite" if part == "core" else part  # how --break names the part
        cmd += [f"--break={phase}" for which, phase in self.forward if which == tag]
        return self.child("suite" if part == "core" else part, cmd, timeout_s)  # the phase's name

    def train(self):
        """The shipped small Kontext trained further on this device; the checkpoint and its log into the results."""
        import shutil

        minutes = 0.05 if self.args.rehearse else self.args.train_minutes
        left = self.record.left_s() / self.slack - TRAIN_OVERHEAD_S
        if 60 * minutes > left:
            raise PhaseError(f"--train-minutes {minutes:g} does not fit: {max(left, 0) / 60:.1f} min are left")
        device = "cpu" if self.args.rehearse else "cuda"
        with tempfile.TemporaryDirectory(prefix="kontext-rt-train-") as tmp:
            out = Path(tmp) / "small-kontext"
            cmd = ["-m", "kontext_toy.training.train", "--device", device]
            cmd += ["--flux-minutes", str(minutes), "--out", str(out)]
            cmd += ["--init-from", str(ROOT / "runtime" / "kontext_toy" / "small_kontext")]
            cmd += TRAIN_REHEARSAL_ARGS if self.args.rehearse else TRAIN_ARGS
            try:
                return self.child("train", cmd, (60 * minutes + TRAIN_OVERHEAD_S) * self.slack)
            finally:  # a failed evaluation or a kill must not lose a checkpoint the script already wrote
                if (out / "train_log.json").is_file():
                    shutil.copy(out / "train_log.json", self.out / "train_log.json")
                if (out / "transformer").is_dir():
                    archive = shutil.make_archive(str(Path(tmp) / "small-kontext-gpu"), "gztar", tmp, "small-kontext")
                    shutil.move(archive, self.out / "small-kontext-gpu.tar.gz")

    def script(self, name, out_name, timeout_s, *extra):
        return self.child(name, [str(SCRIPTS[name]), "--out", str(self.out / out_name), *extra], timeout_s)

    def main(self) -> int:
        r, wanted = self.record, self.args.only
        r.run("install", self.install)
        r.run("env", self.env_probe)
        steps = [
            ("suite", lambda: self.suite("core", CORE_END_S * self.slack - r.elapsed_s())),
            (
                "kernels",
                lambda: self.script(
                    "kernels", "kernels.json", self.deadline("kernels"), *["--smoke"] * self.args.rehearse
                ),
            ),
            ("tensorrt", lambda: self.script("tensorrt", "tensorrt.json", self.deadline("tensorrt"))),
            (
                "memory",
                lambda: self.script(
                    "memory",
                    "memory.json",
                    self.deadline("memory"),
                    *["--smoke"] * self.args.rehearse,
                    f"--budget-s={self.deadline('memory') - 20}",
                ),
            ),
            ("parallel", self.parallel),
            ("torchao", lambda: self.suite("torchao", self.deadline("torchao"))),
            ("compile", lambda: self.suite("compile", r.left_s())),
            ("train", self.train),
        ]
        for name, fn in steps:
            if (wanted and name not in wanted) or (name in OPT_IN and not wanted):
                why = f"opt-in (--only {name})" if name in OPT_IN and not wanted else "not selected (--only)"
                self.data["phases"][name] = {"status": "skipped", "reason": why}
                continue
            r.run(name, fn, needs=["install"], estimate_s=MIN_COMPILE_S * self.slack if name == "compile" else 0)
        for leftover in self.out.glob("*.tmp*"):  # a child killed mid-write: its complete file is the last one
            leftover.unlink()
        files = sorted(p.name for p in self.out.iterdir())
        self.data["files"] = files
        if len(files) > MAX_FILES:
            self.data["phases"]["files"] = {
                "status": "failed",
                "error": f"{len(files)} files in {self.out}: only {MAX_FILES} come back from the device",
            }
        problems = [
            n
            for n, e in self.data["phases"].items()
            if e["status"] == "failed" or (e["status"] == "skipped" and "--only" not in e.get("reason", ""))
        ]
        self.data["ok"] = not problems
        r.write()
        if run_folder.in_results(self.out):  # a run folder of results/ has its manifest (not $OUT: 8 files at most)
            run_folder.gpu_manifest(self.out)
        say(
            f"[run {r.elapsed_s():.0f}s] {'all phases ok' if not problems else 'not ok: ' + ', '.join(problems)}; "
            f"files: {', '.join(files)}"
        )
        self.log.close()
        if self.site is not None:
            self.site.cleanup()
        return 0 if not problems else 1


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    p.add_argument("--rehearse", action="store_true", help="the same run on a CPU machine: checks, times nothing")
    p.add_argument("--wheels", type=Path, default=ROOT / "wheels", help="the carried wheels (gpu_wheels.sh)")
    p.add_argument(
        "--only",
        type=lambda s: set(s.split(",")),
        default=None,
        help=f"comma-separated phases among {', '.join(PHASES[2:])} (install and env always run)",
    )
    p.add_argument(
        "--train-minutes", type=float, default=3.0, help="the train phase's transformer budget (--only train)"
    )
    add_break_option(p, "fail this phase on purpose; SUITE:PHASE for one inside gpu_suite (suite: or compile:)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.out is None:
        p.error("give --out DIR (on the GPU machine $OUT is the default)")
    if args.only and (unknown := args.only - set(PHASES[2:])):
        p.error(f"--only: unknown phases {sorted(unknown)}; choose among {', '.join(PHASES[2:])}")
    if args.only and set(ALONE) & args.only and len(args.only) > 1:
        p.error(f"--only: {', '.join(ALONE)} runs alone, in its own command (it takes the command's time)")
    if not 0 < args.train_minutes <= 5:
        p.error("--train-minutes must be above 0 and at most 5 (with the pool and the evaluation: one command)")
    for b in args.broken:
        which, _, phase = b.rpartition(":")
        if which not in ("", "suite", "torchao", "compile") or (not which and phase not in PHASES):
            p.error(f"--break {b}: name a phase ({', '.join(PHASES)}) or suite:PHASE / torchao:PHASE / compile:PHASE")
    args.out = args.out.resolve()
    if args.rehearse and args.out.is_relative_to((BENCH / "results").resolve()):
        p.error("--rehearse timings are not GPU timings: write them outside benchmarks/results")
    return args


def main(argv=None) -> int:
    t0 = time.perf_counter()  # the budget counts from here, the GPU probe included
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.rehearse:
        try:
            subprocess.run(["nvidia-smi", "-L"], capture_output=True, check=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as err:
            message = "no NVIDIA GPU here (nvidia-smi fails); on a CPU machine run with --rehearse"
            write_json(args.out / "run.json", {"mode": "gpu", "ok": False, "error": f"{message}: {err}"})
            print(f"error: {message}", file=sys.stderr)
            return 2
    return Run(args, t0).main()


if __name__ == "__main__":
    sys.exit(main())
