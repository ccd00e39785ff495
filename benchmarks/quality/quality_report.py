"""What each speed option costs in quality, next to what it buys in speed: the shapes task on the CPU.

    python benchmarks/quality/quality_report.py --checkpoint DIR --out-json F.json --out-png F.png [--n 20] [--seed 0]
        [--turns 3] [--steps 8] [--threads 1]
        [--options bf16,fp16,fp8-dynamic,fp8-static,fp8-attention,fp8-attention-smooth-k,onnx-ort,triton,steps]

Every option edits the same held-out samples (kontext_toy.shapes, split "heldout") with the same seeds
(sample i: seed + i) and is scored by kontext_toy.harness.compare against fp32 eager, in three groups:

  precision  fp32 eager (the reference), bf16, fp16, FP8 dynamic, FP8 static, FP8 attention (attention='fa3-fp8'
             emulated: the bf16 model with q, k, v in e4m3 per (batch, head), with and without smooth_k) and the ONNX
             transformer graph in ONNX Runtime (CPU provider), all at --steps steps (default 8: the cost of a step
             count is the schedule group's business, and 8 steps keep the whole report within minutes on one core)
  schedule   fp32 eager at 28, 8 and 4 steps, against 28 steps
  triton     the Triton kernels (fp32) against fp32 eager at --steps, on the first --triton-n samples only: on the
             CPU they run under the Triton interpreter (TRITON_INTERPRET=1), about 4 s per step of a 2M-parameter
             model, so their time is interpreter time and says nothing about the kernels' speed

FP8 static's scales come from the export stage's calibration (export/fp8.py: ModelOpt's recipe, calibration_loop
through the real pipeline, save_calibration), run here on --calibration-n train-split edits. FP8 runs emulated on
the CPU (bf16 around dequantized e4m3 products).

Per-step drift (bf16, fp16, FP8, ONNX): the RMS over every edit sample of the float32 latent after each denoising
step minus fp32 eager's latent after the same step (same sample, same seed), and the PSNR of the decoded image
against fp32's. The multi-turn curve: the harness's drift (each turn a recolour and its undo, chained) per option.

Time: wall time (benchmarks/timing.py) on this machine's CPU with --threads threads (torch and ONNX Runtime), median
over every edit call of an option (its samples' edits and their drift turns) after one untimed warm-up edit;
edit_median_s counts VAE encode + denoising + VAE decode (not the text encoders, whose embeddings are cached
after a prompt's first use), denoise_median_s the denoising loop alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

import torch

from kontext_rt.errors import BackendUnavailable, InputError
from kontext_rt.requests import RunReport
from kontext_rt.sampling.denoisers import PerStep
from kontext_toy import harness, metrics, shapes
from kontext_toy.shapes import EditSample

# its step and chart modules, and the timer, by plain name
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import run_folder  # noqa: E402
import timing  # noqa: E402
from quality_steps import OrtTransformer, step_drift, trajectories  # noqa: E402

FORMAT = "kontext-rt quality report v1"
SCHEDULE = (28, 8, 4)  # the first is the schedule group's reference
REFERENCE = "fp32"
# option -> (what it is, the modules it needs)
OPTIONS = {
    "bf16": ("bfloat16 weights and activations, eager backend", ()),
    "fp16": ("float16 weights and activations, eager backend", ()),
    "fp8-dynamic": ("FP8 e4m3 block linears, per-token activation scales (bf16 model, emulated on the CPU)", ()),
    "fp8-static": ("FP8 e4m3 block linears, static scales from the export stage's calibration", ("modelopt",)),
    "fp8-attention": (
        "attention='fa3-fp8' emulated: the bf16 model, q, k, v in e4m3 with one scale per (batch, head), attention "
        "in float32 (backends.attention.EmulatedFa3)",
        (),
    ),
    "fp8-attention-smooth-k": ("fp8-attention with k minus its token mean before quantization (smooth_k)", ()),
    "onnx-ort": (
        "the exported fp32 transformer graph run by ONNX Runtime's CPU provider",
        ("onnx", "onnxruntime", "onnxscript"),
    ),
    "triton": ("the Triton kernels (fp32) under the Triton interpreter", ("triton",)),
    "steps": (f"fp32 eager at {', '.join(map(str, SCHEDULE))} steps", ()),
}
# the options whose latents are followed
PER_STEP = ("bf16", "fp16", "fp8-dynamic", "fp8-static", "fp8-attention", "fp8-attention-smooth-k", "onnx-ort")
NOT_RUN = {
    "cuda-graphs": "Optimizations(cuda_graphs=True) captures CUDA graphs and needs a CUDA device; this machine has "
    "none. It replays the hoisted step bit for bit (tests/test_graphs.py): its quality is its dtype's eager quality",
    "tensorrt": "backend='tensorrt' runs TensorRT engines and needs a CUDA GPU and TensorRT; this machine has neither",
    "compile": "regional torch.compile is a GPU speed option (inductor's Triton kernels); on the CPU inductor would "
    "generate C++ instead, a different program from the one deployed",
}


@dataclass(frozen=True)
class Config:
    checkpoint: Path
    out_json: Path
    out_png: Path
    n: int = 20
    seed: int = 0
    turns: int = 3
    steps: int = 8
    options: tuple[str, ...] = tuple(OPTIONS)
    threads: int = 1
    triton_n: int = 2
    triton_turns: int = 1
    calibration_n: int = 8
    max_sequence_length: int = 64
    onnx_exporter: str = "dynamo"  # what the export stage uses for fp32 graphs
    missing: tuple[tuple[str, str], ...] = ()  # (option, why) left out of the default set: a module is missing


# ---- arguments ----------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="diffusers-layout folder of the model")
    p.add_argument("--out-json", required=True, type=Path)
    p.add_argument("--out-png", required=True, type=Path)
    p.add_argument("--n", type=int, default=20, help="held-out samples (every kind in turn)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; sample i runs with noise seed seed + i")
    p.add_argument("--turns", type=int, default=3, help="edit-then-undo turns of the drift sessions")
    p.add_argument("--steps", type=int, default=8, help="steps of the precision and backend options")
    p.add_argument("--options", help=f"comma-separated subset of {', '.join(OPTIONS)} (default: all that can run)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and ONNX Runtime")
    p.add_argument("--triton-n", type=int, default=2, help="samples the interpreted Triton option runs (0: none)")
    p.add_argument("--triton-turns", type=int, default=1, help="its drift turns")
    p.add_argument("--calibration-n", type=int, default=8, help="train-split edits FP8 static is calibrated on")
    p.add_argument("--max-sequence-length", type=int, default=64)
    p.add_argument("--onnx-exporter", choices=("dynamo", "torchscript"), default="dynamo")
    return p


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise InputError(f"--{name} must be at least {low}, got {value}")


def check(args: argparse.Namespace) -> Config:
    """Every argument checked before any work; InputError names the first bad one."""
    if not args.checkpoint.is_dir():
        raise InputError(f"--checkpoint {args.checkpoint}: no such folder")
    for flag, path in (("out-json", args.out_json), ("out-png", args.out_png)):
        if not path.parent.is_dir():
            raise InputError(f"--{flag} {path}: its folder {path.parent} does not exist")
        if path.is_dir():
            raise InputError(f"--{flag} {path} is a folder, not a file name")
        if path.resolve().parent == run_folder.RESULTS.resolve():
            raise InputError(f"--{flag} {path}: write into a run folder, benchmarks/results/<device>-<what>-<date>/")
    if args.out_json.resolve() == args.out_png.resolve():
        raise InputError("--out-json and --out-png name the same file")
    for name, low in (("n", 1), ("seed", 0), ("turns", 0), ("steps", 1), ("threads", 1), ("triton-n", 0)):
        _at_least(name, getattr(args, name.replace("-", "_")), low)
    for name, low in (("triton-turns", 0), ("calibration-n", 1), ("max-sequence-length", 1)):
        _at_least(name, getattr(args, name.replace("-", "_")), low)
    given = args.options is not None
    options = tuple(dict.fromkeys(o.strip() for o in (args.options or ",".join(OPTIONS)).split(",") if o.strip()))
    if not options:
        raise InputError("--options names no option")
    if unknown := [o for o in options if o not in OPTIONS]:
        raise InputError(f"--options: unknown {', '.join(unknown)}; choose from {', '.join(OPTIONS)}")
    missing = []
    for option in options:
        if lacking := [m for m in OPTIONS[option][1] if find_spec(m) is None]:
            why = f"needs {', '.join(lacking)}, which is not installed here"
            if given:  # asked for by name: refused, not quietly left out
                raise InputError(f"--options {option} {why}")
            missing.append((option, why))
    runnable = tuple(o for o in options if o not in dict(missing))
    return Config(**{**vars(args), "options": runnable, "missing": tuple(missing)})


# ---- what is measured ---------------------------------------------------------------------------------------------


class Timed:
    """A pipeline as the harness calls it, timing every edit (RunReport stages); `steps` overrides the harness's."""

    def __init__(self, pipe, steps: int | None = None, note: str | None = None):
        self.pipe, self.steps, self.note = pipe, steps, note
        self.edits: list[RunReport] = []
        self.walls: list[float] = []

    def _steps(self, kw: dict) -> dict:
        return kw if self.steps is None else {**kw, "steps": self.steps}

    def edit(self, image, prompt, **kw):
        report = RunReport()
        out, sample = timing.timed(lambda: self.pipe.edit(image, prompt, report=report, **self._steps(kw)))
        self.walls.append(sample.wall_ms / 1e3)
        self.edits.append(report)
        return out

    def generate(self, prompt, **kw):
        return self.pipe.generate(prompt, **self._steps(kw))

    def warm_up(self, sample: EditSample) -> None:
        """One untimed one-step edit: first-call costs (allocations, lazy initialisation) stay out of the times."""
        self.pipe.edit(sample.source, sample.instruction, steps=1, seed=0, auto_resize=False)

    def times(self, threads: int) -> dict:
        stage = lambda r, names: sum(r.timings.get(k, 0.0) for k in names)
        return {
            "clock": f"wall time on this machine's CPU, {threads} thread(s)",
            "edits_timed": len(self.edits),
            "steps_run": sorted({r.steps for r in self.edits}),
            "edit_median_s": statistics.median(stage(r, ("vae_encode", "denoise", "vae_decode")) for r in self.edits),
            "denoise_median_s": statistics.median(stage(r, ("denoise",)) for r in self.edits),
            "wall_median_s": statistics.median(self.walls),
            "meaningful_as_speed": self.note is None,
            **({"note": self.note} if self.note else {}),
        }


# ---- the options --------------------------------------------------------------------------------------------------


def ort_pipeline(cfg: Config, folder: Path, exporter: str | None = None):
    """An fp32 pipeline whose denoiser runs the exported transformer graph in ONNX Runtime (the VAE and the text
    encoders stay the runtime's)."""
    from kontext_rt.export import specs
    from kontext_rt.export.onnx_export import export_onnx, transformer_graph

    pipe = load(cfg)
    spec = specs.transformer_spec(pipe.cfg, text_tokens=pipe.max_sequence_length)
    graph = transformer_graph(pipe.transformer)
    path = export_onnx(graph, spec, folder / "transformer.onnx", torch.float32, exporter or cfg.onnx_exporter)
    pipe.denoiser = PerStep(OrtTransformer(path, cfg.threads), torch.float32)
    return pipe


def fp8_attention_pipeline(cfg: Config, smooth_k: bool):
    """A bf16 pipeline whose attention is the fa3-fp8 path (the reference pre-pass, e4m3 per head) with FA3's
    forward emulated in plain torch: what the CPU can measure of FP8 attention's quality cost."""
    from dataclasses import replace

    from kontext_rt.backends.attention import AttentionChoice, EmulatedFa3
    from kontext_rt.kernels import reference
    from kontext_rt.model.op_table import EAGER_OPS
    from kontext_rt.options import Attention
    from kontext_rt.sampling.denoisers import for_model

    pipe = load(cfg, dtype=torch.bfloat16)
    choice = AttentionChoice(Attention.FA3_FP8, EmulatedFa3, reference.attention_prepass, smooth_k=smooth_k)
    pipe.denoiser = for_model(pipe.transformer, replace(EAGER_OPS, attention=choice.op(None)), torch.bfloat16)
    return pipe


def calibrate_fp8(cfg: Config, folder: Path) -> tuple[Path, dict]:
    """The export stage's FP8 calibration (as Export._calibrate: a bf16 pipeline, ModelOpt's recipe, real edits)
    on train-split edits, which the held-out samples never share a (colour, kind) pair with."""
    from kontext_rt.export import fp8
    from kontext_rt.weights.formats import detect

    train = list(shapes.dataset("train", cfg.calibration_n, seed=cfg.seed, kinds=shapes.EDIT_KINDS))
    prompts, images = tuple(s.instruction for s in train), tuple(s.source for s in train)
    data = fp8.CalibrationSet(prompts, images, steps=cfg.steps, size=images[0].size[0], auto_resize=False)
    pipe = load(cfg, dtype=torch.bfloat16)
    fp8.quantize(pipe.transformer, fp8.calibration_loop(pipe, data))
    path = fp8.save_calibration(pipe.transformer, folder / "fp8.safetensors", detect(cfg.checkpoint).fingerprint())
    return path, data.describe()


def load(cfg: Config, **kw):
    from kontext_rt.pipeline import Pipeline

    return Pipeline.from_pretrained(cfg.checkpoint, max_sequence_length=cfg.max_sequence_length, **kw)


def build(name: str, cfg: Config, folder: Path) -> tuple[object, dict]:
    """(pipeline, how it was made) for one option of the precision or triton group."""
    from kontext_rt.options import Optimizations

    if name in ("bf16", "fp16"):
        return load(cfg, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[name]), {}
    if name == "fp8-dynamic":
        return load(cfg, dtype=torch.bfloat16, optimize=Optimizations(fp8="dynamic")), {}
    if name == "fp8-static":
        path, data = calibrate_fp8(cfg, folder)
        opts = Optimizations(fp8="static", fp8_calibration=path)
        return load(cfg, dtype=torch.bfloat16, optimize=opts), {"calibration": data}
    if name in ("fp8-attention", "fp8-attention-smooth-k"):
        smooth_k = name == "fp8-attention-smooth-k"
        return fp8_attention_pipeline(cfg, smooth_k), {"emulated": True, "smooth_k": smooth_k}
    if name == "onnx-ort":
        return ort_pipeline(cfg, folder), {"exporter": cfg.onnx_exporter, "provider": "CPUExecutionProvider"}
    if name == "triton":
        return load(cfg, backend="triton"), {"interpreted": True}
    raise InputError(f"unknown option {name!r}")


# ---- the groups ---------------------------------------------------------------------------------------------------


def run_group(configs: dict[str, Timed], samples, steps: int, seed: int, turns: int, threads: int) -> dict:
    """harness.compare over Timed pipelines (the first is the reference), with each one's times."""
    first = next((s for s in samples if isinstance(s, EditSample)), None)
    for timed in configs.values():
        if first is not None:
            timed.warm_up(first)
    res = harness.compare(configs, samples, steps=steps, seed=seed, drift_turns=turns, embed=metrics.scene_embedding)
    out = {}
    for name, timed in configs.items():
        quality = res["results"][name]
        if timed.steps is not None:
            quality = {**quality, "steps": timed.steps}
        out[name] = {
            "quality": quality,
            "delta": res["delta"][name],
            "output_psnr": res["output_psnr"][name],
            "time": timed.times(threads),
        }
    return {"reference": res["reference"], "steps": steps, "n": len(samples), "turns": turns, "options": out}


def _built(names, cfg: Config, folder: Path, not_run: dict, log) -> dict[str, tuple[object, dict]]:
    pipes = {}
    for name in names:
        setup = timing.Stopwatch()
        try:
            pipe, how = build(name, cfg, folder)
        except (BackendUnavailable, ImportError) as err:
            not_run[name] = f"could not be built here: {err}"
            log(f"{name}: not run, {not_run[name]}")
            continue
        pipes[name] = (pipe, {**how, "what": OPTIONS[name][0], "setup_s": setup.elapsed_s()})
    return pipes


def _with_setup(group: dict, pipes: dict) -> dict:
    for name, (_, how) in pipes.items():
        if name in group["options"]:
            group["options"][name].update(how)
    return group


# options whose CPU time says nothing about the speed the option buys where it is meant to run
SPEED_NOTES = {
    "triton": "Triton interpreter (TRITON_INTERPRET=1) on the CPU: interpreter time, meaningless as kernel speed",
    "fp8-dynamic": "FP8 emulated on the CPU (bf16 around dequantized e4m3 products): not FP8 tensor-core speed",
    "fp8-static": "FP8 emulated on the CPU (bf16 around dequantized e4m3 products): not FP8 tensor-core speed",
    "fp8-attention": "FP8 attention emulated on the CPU (float32 attention of dequantized e4m3): not FA3's speed",
    "fp8-attention-smooth-k": "FP8 attention emulated on the CPU (float32 attention of dequantized e4m3): not FA3's "
    "speed",
}


def measure(cfg: Config, log=lambda line: None) -> dict:
    """Every selected option on the same samples and seeds: the report's body (no files written)."""
    samples = list(shapes.dataset("heldout", cfg.n, seed=cfg.seed))
    kinds = {k: sum(s.kind == k for s in samples) for k in dict.fromkeys(s.kind for s in samples)}
    ref = load(cfg)
    groups, not_run = {}, {**NOT_RUN, **dict(cfg.missing)}
    group = lambda configs, part, steps, turns: run_group(configs, part, steps, cfg.seed, turns, cfg.threads)
    with tempfile.TemporaryDirectory(prefix="quality-report-") as tmp:
        pipes = _built([o for o in cfg.options if o not in ("steps", "triton")], cfg, Path(tmp), not_run, log)
        log(f"precision group: {REFERENCE}, {', '.join(pipes)} at {cfg.steps} steps")
        configs = {REFERENCE: Timed(ref), **{k: Timed(p, note=SPEED_NOTES.get(k)) for k, (p, _) in pipes.items()}}
        groups["precision"] = _with_setup(group(configs, samples, cfg.steps, cfg.turns), pipes)
        if "steps" in cfg.options:
            log(f"schedule group: {REFERENCE} at {', '.join(map(str, SCHEDULE))} steps")
            configs = {f"steps-{s}": Timed(ref, steps=s) for s in SCHEDULE}
            groups["schedule"] = group(configs, samples, SCHEDULE[0], cfg.turns)
        if "triton" in cfg.options and cfg.triton_n:
            tri = _built(["triton"], cfg, Path(tmp), not_run, log)
            if tri:
                log(f"triton group: {min(cfg.triton_n, cfg.n)} sample(s) under the interpreter (slow)")
                configs = {REFERENCE: Timed(ref), "triton": Timed(tri["triton"][0], note=SPEED_NOTES["triton"])}
                groups["triton"] = _with_setup(
                    group(configs, samples[: cfg.triton_n], cfg.steps, cfg.triton_turns), tri
                )
        per_step = {}
        if drifting := [o for o in PER_STEP if o in pipes]:
            log(f"per-step drift: {', '.join(drifting)}")
            want = trajectories(ref, samples, cfg.steps, cfg.seed)
            for o in drifting:
                per_step[o] = step_drift(want, trajectories(pipes[o][0], samples, cfg.steps, cfg.seed))
    return {
        "samples": {"split": "heldout", "n": cfg.n, "seed": cfg.seed, "kinds": kinds, "noise_seeds": "seed + i"},
        "guidance": {"edit": ref.variant.edit_guidance, "generate": ref.variant.generate_guidance},
        "groups": groups,
        "per_step_drift": {"reference": REFERENCE, "steps": cfg.steps, "options": per_step},
        "not_run": not_run,
    }


# ---- the report ---------------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine(threads: int) -> dict:
    """run_folder.host's machine facts, with the threads this report ran on and the versions it depends on."""
    return run_folder.host(
        threads=threads,
        torch_threads=torch.get_num_threads(),
        versions={d: _version(d) for d in ("torch", "onnx", "onnxruntime", "triton", "nvidia-modelopt", "numpy")},
    )


def checkpoint_sha256(folder: Path) -> str:
    """sha256 over every .safetensors file of the checkpoint folder (relative path, then bytes), in sorted order:
    not the per-part digest of the training records (train_small_kontext.weights_sha256)."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def report(cfg: Config, log=lambda line: None) -> dict:
    run = timing.Stopwatch()
    # the path as given (a committed record must not carry this machine's folders); the digest names the weights
    checkpoint = {"path": str(cfg.checkpoint), "weights_sha256": checkpoint_sha256(cfg.checkpoint)}
    body = measure(cfg, log)
    return {
        "format": FORMAT,
        "machine": machine(cfg.threads),
        "checkpoint": checkpoint,
        "steps": cfg.steps,
        "schedule_steps": list(SCHEDULE),
        "turns": cfg.turns,
        "triton": {"n": min(cfg.triton_n, cfg.n), "turns": cfg.triton_turns},
        "max_sequence_length": cfg.max_sequence_length,
        **body,
        "run_seconds": run.elapsed_s(),
    }


def _atomic(path: Path, write) -> None:
    """write(tmp_path) beside path, then rename: an interrupted run never leaves a file that looks finished."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(result: dict, path: Path) -> None:
    text = json.dumps(result, indent=1, allow_nan=False)
    _atomic(path, lambda tmp: tmp.write_text(text + "\n"))


def write_png(result: dict, path: Path) -> None:
    from quality_chart import draw

    _atomic(path, lambda tmp: draw(result, tmp))


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        cfg = check(args)
    except InputError as err:
        p.error(str(err))
    if "triton" in cfg.options:
        # the kernels compile for the interpreter only when this is set before anything imports triton
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print(
                "triton was imported before TRITON_INTERPRET=1 could be set: its option will not run", file=sys.stderr
            )
        os.environ["TRITON_INTERPRET"] = "1"
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    started = run_folder.now_utc()
    try:
        result = report(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        torch.set_num_threads(threads)
    write_json(result, cfg.out_json)
    write_png(result, cfg.out_png)
    what = "what each speed option costs in quality on the small Kontext, and its CPU time (quality_report.py)"
    for path in (cfg.out_json, cfg.out_png):  # in results/: their run folder's manifest
        run_folder.record(path, what, run_folder.host(threads=cfg.threads), started, __file__, argv)
    print(f"wrote {cfg.out_json} and {cfg.out_png} in {result['run_seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
