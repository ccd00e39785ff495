"""The speed ladder of the runtime on a full-size FLUX.1 Kontext transformer (random weights), in phases.

    python benchmarks/gpu/gpu_suite.py --out DIR [--part core|compile] [--deadline-s 285]
    python benchmarks/gpu/gpu_suite.py --rehearse --out DIR      # CPU: tiny model, the Triton interpreter, stand-ins

`bash benchmarks/gpu_run.sh` runs it (the core first, the compile part last); run it alone to repeat one part.
Layouts: "kontext" = 512 text + 4096 target + 4096 context tokens (a 1024x1024 edit of a 1024x1024 image, 8704 in
attention); "text-to-image" = 512 + 4096. The rungs, each adding one option to the one before it, are the table
in rungs.py (eager, triton, hoisted, graphs, fp8; compile, in the `compile` part, run last and time-boxed): this
suite's phases are derived from it, and each rung runs as its backend and Optimizations say. Beside them runs
diffusers' FluxTransformer2DModel (eager bf16, same sizes, built once for both layouts) as the baseline.

Per rung and layout: per-step latency (CUDA events, median of --repeats loops of --steps-timed steps after a short
warm-up loop), host time per step (the CPU time to issue a loop), MFU = step FLOPs / time / the measured bf16 (FP8
for the FP8 rungs) matmul rate, peak GPU memory. A profile of diffusers' step and of the eager one (10% slower than
diffusers' on an H200, with the same torch ops: the two profiles side by side say where) and of the bf16 and FP8
steps (hoisted, not graphed) names the ops that take the time ("profile"). Then
end-to-end edits at 4, 8 and 28 steps with VAE encode and decode (text embeddings as a cache hit) on the eager
rung, the best bf16 rung and the best fp8 rung; the fewer-calls options' step times on the best fp8 rung
(DPM-Solver++ 2M against Euler, hoisted and graphed; the step cache's cached and full steps); the on-device
exactness checks (hoisted == per-step, graphs == no
graphs, the FP8 quantizer == torch); the FP8 drift against bf16. Every phase is written to <out>/suite.json (or
suite-compile.json, suite-torchao.json) and the chart to <out>/suite-ladder.png as soon as it ends
(benchmarks/machine/phases.py). The torchao part (opt-in) times torchao 0.18's float8 dynamic row-wise linears on a
model of its own, as the fp8 rung: the library's answer to the runtime's FP8 path, side by side.

--rehearse runs the same phases on the CPU: the tiny preset, the Triton kernels in the interpreter, an eager
stand-in for CUDA-graph capture, torch's own _scaled_mm if it takes row-wise scales on the CPU (else a stand-in
with its contract), the diffusers baseline. Its timings are CPU timings of a tiny model: never GPU figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent  # benchmarks/gpu/
BENCH = HERE.parent
# benchmarks' scripts import each other by plain name: this folder (the rungs, the parts), the run's phases
sys.path[:0] = [str(HERE), str(BENCH / "machine")]

import suite_parts as parts  # noqa: E402
from phases import Record, add_break_option, say  # noqa: E402
from rungs import BY_NAME, RUNGS, Rung, goals, ordered, rungs  # noqa: E402
from suite_build import BuildPhases  # noqa: E402
from suite_measure import MeasurePhases  # noqa: E402

LAYOUTS = {"kontext": (512, 4096, 4096), "text-to-image": (512, 4096, 0)}  # text, target, context tokens
# The rehearsal's kernels run in the Triton interpreter, ~1.5 s per step even for the tiny model (one Python
# program per token row): 2x2-token images, and as few steps as still take every branch.
REHEARSE_LAYOUTS = {"kontext": (4, 4, 4), "text-to-image": (4, 4, 0)}
REFERENCE = RUNGS[0]  # the first rung: edited and profiled beside the best ones
# profiled hoisted, never graphed
PROFILED = {"bf16": (REFERENCE, BY_NAME["hoisted"]), "fp8": rungs("core", fp8=True)[:1]}
COMPILE_FP8 = any(r.fp8 for r in rungs("compile"))  # the compile part converts its model to FP8 first


def names(part: str, fp8: bool) -> list[str]:
    return [r.name for r in rungs(part, fp8)]


PHASES = {  # in order, the rungs' from rungs.py; core() and compile_part() run them
    "core": (
        *("setup", "triton-backend", "diffusers", "model", "fa3-probe"),
        *names("core", fp8=False),
        *("checks", "edits-bf16", "profile-bf16", "fp8-convert", "fp8-drift", "fp8-quantizer"),
        *names("core", fp8=True),
        *("edits-fp8", "fewer-calls", "profile-fp8"),
    ),
    "torchao": (
        *("setup", "triton-backend", "model", "torchao-convert"),
        *(r.name for r in rungs("torchao")),
    ),
    "compile": (
        *("setup", "triton-backend", "model"),
        *("fp8-convert",) * COMPILE_FP8,
        "compile-blocks",
        "fa3-probe",  # only when the fastest core rung ran FA3 (compile_on_best)
        *(r.name for r in rungs("compile")),
    ),
}
STEPS = {  # steps per timed loop, timed loops, warm-up loop, edits, FP8 drift trace, exactness loops
    "gpu": dict(steps_timed=6, repeats=3, warmup=2, edits=(4, 8, 28), drift=8, exactness=3),
    "rehearse": dict(steps_timed=2, repeats=1, warmup=1, edits=(1, 2), drift=2, exactness=2),
}


@dataclass
class Suite(BuildPhases, MeasurePhases):
    """What the phases of one part share; each phase is a method: the ladder's here, the setup and conversion
    phases in suite_build.py, the measuring ones beside the ladder in suite_measure.py."""

    args: argparse.Namespace
    device: str
    cfg: object
    layouts: dict
    result: dict
    record: Record | None = None
    dtype: torch.dtype = torch.bfloat16
    ops: dict = field(default_factory=dict)
    capture: object = None
    fp8_matmul: object = None
    vae: object = None
    model: object = None
    data: dict = field(default_factory=dict)
    denoisers: dict = field(default_factory=dict)
    attention: dict = field(default_factory=dict)  # Attention kind -> the AttentionChoice fa3-probe made
    reference: tuple | None = None  # the bf16 trace the FP8 drift is measured against
    core: dict = field(default_factory=dict)  # the core part's results, when this is the compile part
    step_s: float = 0.5  # seconds per Kontext step, for phase estimates: a guess until the first rung is timed
    charted: int = -1

    # --- the ladder ----------------------------------------------------------------------------------------------

    def ops_for(self, rung: Rung):
        """The rung's op table: its backend's, with FA3 (as fa3-probe chose it) for an fa3 or fa3-fp8 rung."""
        import dataclasses

        ops = self.ops[rung.backend]
        if not rung.fa3:
            return ops
        return dataclasses.replace(ops, attention=self.attention[rung.optimize.attention].op(ops.attention))

    def denoiser(self, rung: Rung):
        """The rung's denoiser over the model, as its Optimizations say (per-step, hoisted or graphed, over its
        backend's ops), made once per rung."""
        from kontext_rt.sampling.denoisers import for_model

        if rung.name not in self.denoisers:
            o = rung.optimize
            ops = self.ops_for(rung)
            self.denoisers[rung.name] = for_model(self.model, ops, self.dtype, o.hoist, o.cuda_graphs, self.capture)
        return self.denoisers[rung.name]

    @property
    def steps(self) -> dict:
        return STEPS["rehearse" if self.args.rehearse else "gpu"]

    def time_loop(self, run, data):
        n = self.steps
        return parts.time_loop(run, *data, self.device, n["steps_timed"], n["repeats"], n["warmup"])

    def loop(self, rung: Rung):
        """The rung's sampling loop, (x, sigmas, cond) -> x."""
        return parts.loop_fn(self.model, self.ops_for(rung), self.dtype, self.denoiser(rung))

    def rung(self, rung: Rung):
        """Time one rung on every layout, writing after each (a kill keeps the layouts done)."""
        run = self.loop(rung)
        peak = self.result["matmul_tflops"]["fp8" if rung.fp8 else "bf16"]
        row = self.result["ladder"].setdefault(rung.name, {})
        for key, data in self.data.items():
            parts.reset_peak(self.device)
            ms, host = self.time_loop(run, data)
            flops = parts.step_flops(self.cfg, *self.layouts[key])
            row[key] = {
                "ms_per_step": ms,
                "host_ms_per_step": host,
                "tflops": flops / ms / 1e9,
                "mfu": flops / ms / 1e9 / peak,
                "peak_gib": parts.peak_gib(self.device),
            }
            if key == "kontext":
                self.step_s = ms / 1e3
            self.record.write()

    def rung_estimate_s(self, rung: Rung | None = None):
        n = self.steps
        loops = 1.5 * len(self.layouts) * (n["warmup"] + n["repeats"] * n["steps_timed"]) * self.step_s
        compiling = 30 if self.args.rehearse else 120  # inductor: 2 block types x 2 layouts, in the warm-up loops
        return loops + (compiling if rung is not None and rung.optimize.compile else 0)

    def run_rung(self, rung: Rung):
        self.record.run(rung.name, lambda: self.rung(rung), needs=rung.needs(), estimate_s=self.rung_estimate_s(rung))

    def best(self, fp8: bool) -> list[Rung]:
        """The last core rung of a precision that hoists and succeeded (each rung adds to the one before it), if
        any: the one whose edits are timed."""
        ok = [
            r
            for r in rungs("core", fp8)
            if r.optimize.hoist and self.result["phases"].get(r.name, {}).get("status") == "ok"
        ]
        return ok[-1:]

    # --- results -------------------------------------------------------------------------------------------------

    def before_write(self):
        """Goals and the chart follow the ladder on every write. The compile part charts the core's rungs too
        (read from its suite.json, written earlier in the same run), so the one chart has every rung."""
        self.result["goals_h100"] = goals(self.result)
        ladder = {**self.core.get("ladder", {}), **self.result["ladder"]}
        labels = [r for r in ordered(ladder) if "kontext" in ladder[r]]
        if labels and len(labels) != self.charted:
            self.charted = len(labels)
            base = {**self.core, **self.result}.get("diffusers", {}).get("kontext", {}).get("ms_per_step")
            values = [ladder[r]["kontext"]["ms_per_step"] for r in labels]
            try:  # a chart is a view of the JSON: its failure must not cost a measurement
                parts.write_png(self.args.out / "suite-ladder.png", labels, values, base)
                self.result.pop("chart_error", None)
            except Exception as err:
                self.result["chart_error"] = f"{type(err).__name__}: {err}"[:500]


def core(s: Suite) -> None:
    r = s.record
    r.run("setup", s.setup)
    r.run("triton-backend", s.triton_backend, needs=["setup"])
    if not s.args.no_diffusers:
        r.run("diffusers", s.baseline, needs=["setup"], estimate_s=s.rung_estimate_s())
    r.run("model", s.build_model, needs=["setup"])
    r.run("fa3-probe", s.fa3_probe, needs=["triton-backend"])
    for rung in rungs("core", fp8=False):
        s.run_rung(rung)
    r.run("checks", s.checks, needs=["model", "triton-backend"], estimate_s=15 * s.step_s)
    r.run(
        "edits-bf16",
        lambda: s.edits([REFERENCE, *s.best(fp8=False)]),
        needs=["model", REFERENCE.name],
        estimate_s=s.edits_estimate_s(2),
    )
    r.run(
        "profile-bf16",
        lambda: s.profile(*PROFILED["bf16"]),
        needs=["model", "triton-backend"],
        estimate_s=8 * len(PROFILED["bf16"]) * s.step_s,
    )
    r.run(
        "fp8-convert",
        lambda: s.fp8_convert(keep_reference=True),
        needs=["model", "triton-backend"],
        estimate_s=2 * s.steps["drift"] * s.step_s,
    )
    r.run("fp8-drift", s.fp8_drift, needs=["fp8-convert"], estimate_s=2 * s.steps["drift"] * s.step_s)
    r.run("fp8-quantizer", s.quantizer, needs=["triton-backend"])
    fp8 = rungs("core", fp8=True)
    for rung in fp8:
        s.run_rung(rung)
    first = [x.name for x in fp8[:1]]  # the edits need an FP8 rung that ran; they take the best one
    r.run("edits-fp8", lambda: s.edits(s.best(fp8=True)), needs=first, estimate_s=s.edits_estimate_s())
    r.run("fewer-calls", lambda: s.fewer_calls(s.best(fp8=True)), needs=first, estimate_s=s.fewer_calls_estimate_s())
    r.run(
        "profile-fp8",
        lambda: s.profile(*PROFILED["fp8"]),
        needs=["fp8-convert"],
        estimate_s=8 * len(PROFILED["fp8"]) * s.step_s,
    )


def torchao_part(s: Suite) -> None:
    """torchao's float8 linears on a model of their own (its own process, opt-in: --only torchao in gpu_run), timed
    as the runtime's fp8 rung is, to compare the library's FP8 path with the hand-written one."""
    r = s.record
    r.run("setup", s.setup)
    r.run("triton-backend", s.triton_backend, needs=["setup"])
    r.run("model", s.build_model, needs=["setup"])
    r.run("torchao-convert", s.torchao_convert, needs=["model"])
    for rung in rungs("torchao"):
        s.run_rung(rung)


def compile_part(s: Suite) -> None:
    """The rungs with torch.compile (compile = fp8 + graphs + torch.compile of each block): rebuilt from scratch in
    its own process, so the core's results never wait on (or die with) inductor."""
    r = s.record
    r.run("setup", s.setup)
    r.run("triton-backend", s.triton_backend, needs=["setup"])
    r.run("model", s.build_model, needs=["setup"])
    if COMPILE_FP8:
        r.run("fp8-convert", lambda: s.fp8_convert(keep_reference=False), needs=["model", "triton-backend"])
    r.run("compile-blocks", s.compile_blocks, needs=["fp8-convert"] if COMPILE_FP8 else ["model", "triton-backend"])
    chosen = compile_on_best(s)
    if any(rung.fa3 for rung in chosen):
        r.run("fa3-probe", s.fa3_probe, needs=["setup"])
    for rung in chosen:  # inductor compiles on first use, inside the rung's warm-up loops
        s.run_rung(rung)


def compile_on_best(s: Suite) -> list[Rung]:
    """The compile rungs on the attention of the fastest core rung of their precision that the core part timed
    (its suite.json, written earlier in the same run): torch.compile goes on top of the best one, FA3 included
    where FA3 won. As rungs.py has them when the core part timed none (the record says which it took)."""
    ladder = s.core.get("ladder", {})
    timed = [
        (ladder[r.name]["kontext"]["ms_per_step"], r)
        for r in rungs("core", COMPILE_FP8)
        if "kontext" in ladder.get(r.name, {})
    ]
    if not timed:
        s.result["compile_on"] = {"rung": None, "why": "the core part timed no rung of this precision"}
        return list(rungs("compile"))
    ms, best = min(timed, key=lambda t: t[0])
    attention = best.optimize.attention
    s.result["compile_on"] = {"rung": best.name, "ms_per_step": ms, "attention": str(attention)}
    return [replace(r, optimize=replace(r.optimize, attention=attention)) for r in rungs("compile")]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for suite.json / suite-compile.json and the chart")
    p.add_argument("--part", choices=tuple(PHASES), default="core")
    p.add_argument("--deadline-s", type=float, default=285.0, help="skip phases that would not end before this")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--rehearse", action="store_true", help="CPU, tiny model: checks the control flow, times nothing")
    add_break_option(p, "fail this phase on purpose (to check that the others still run and are written)")
    args = p.parse_args(argv)
    if unknown := [b for b in args.broken if b not in PHASES[args.part]]:
        p.error(f"--break {unknown[0]}: the {args.part} part has no such phase ({', '.join(PHASES[args.part])})")
    if args.rehearse and args.out.resolve().is_relative_to((BENCH / "results").resolve()):
        p.error("--rehearse timings are not GPU timings: write them outside benchmarks/results")
    return args


def new_suite(args) -> Suite:
    from kontext_rt.config import PRESETS

    rehearse = args.rehearse
    device = "cpu" if rehearse else "cuda"
    cfg = PRESETS["tiny" if rehearse else "flux-kontext-dev"]
    layouts = REHEARSE_LAYOUTS if rehearse else LAYOUTS
    name = "cpu-rehearsal" if rehearse else torch.cuda.get_device_name()
    result = {
        "device": name,
        "date": datetime.date.today().isoformat(),
        "rehearse": rehearse,
        "part": args.part,
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": version("triton"),
            "python": platform.python_version(),
        },
        "config": {"hidden_size": cfg.hidden_size, "depth": cfg.depth, "single": cfg.depth_single_blocks},
        "layouts": layouts,
        "steps": STEPS["rehearse" if rehearse else "gpu"],
        "checks": {},
        "mfu": "step FLOPs / time / the measured matmul rate: bf16 for bf16 rungs, FP8 for fp8 and compile "
        "(whose attention, a third of the FLOPs at 8704 tokens, still runs in bf16: their MFU reads low)",
        "ladder": {},
        "end_to_end_s": {},
    }
    suite = Suite(args, device, cfg, layouts, result, step_s=0.05 if rehearse else 0.5)
    core_file = args.out / "suite.json"
    if args.part != "core" and core_file.exists():
        suite.core = json.loads(core_file.read_text())
        ladder = suite.core.get("ladder", {})
        fp8 = COMPILE_FP8 if args.part == "compile" else True
        timed = [ladder[r.name]["kontext"] for r in rungs("core", fp8) if "kontext" in ladder.get(r.name, {})]
        if timed:  # the compile rungs' estimate starts from the last core rung of their precision
            suite.step_s = timed[-1]["ms_per_step"] / 1e3
    name = "suite.json" if args.part == "core" else f"suite-{args.part}.json"
    suite.record = Record(
        args.out / name, result, args.deadline_s, f"suite {args.part}", args.broken, suite.before_write
    )
    return suite


def main(argv=None) -> int:
    args = parse(argv)
    if args.rehearse:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    elif not torch.cuda.is_available():
        print("error: no CUDA GPU here; rehearse on a CPU machine with --rehearse", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    suite = new_suite(args)
    {"core": core, "torchao": torchao_part, "compile": compile_part}[args.part](suite)
    record = suite.record
    say(
        f"[suite {args.part}] done in {record.elapsed_s():.0f} s; failed: {', '.join(record.failed()) or 'none'}; "
        f"not run: {', '.join(n for n in record.incomplete() if n not in record.failed()) or 'none'}; "
        f"goals: {suite.result['goals_h100']}"
    )
    return 1 if record.incomplete() else 0  # only a whole run is a success


if __name__ == "__main__":
    sys.exit(main())
