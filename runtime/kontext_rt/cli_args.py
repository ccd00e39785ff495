"""What every subcommand of the CLI shares: argument types, the usage error, writing outputs, the summary line."""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path

from kontext_rt.errors import InputError

DTYPE_NAMES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}


class UsageError(InputError):
    """A bad command line: a missing or malformed argument, or a user's file that cannot be used."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _int_at_least(minimum: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} must be at least {minimum}")
        return v

    return parse


positive_int, nonneg_int = _int_at_least(1), _int_at_least(0)

MAX_STEPS = 1000  # a typo's bound, not a quality one: FLUX.1 [dev] uses 28 steps, and the server caps at 100


def steps_int(s: str) -> int:
    """--steps: a positive integer of at most MAX_STEPS (a million steps would run for days before anything shows)."""
    v = positive_int(s)
    if v > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"{v} is more than {MAX_STEPS} steps (FLUX.1 [dev] uses 28)")
    return v


def sigmas_list(s: str) -> list[float]:
    """--sigmas: a comma list of numbers (explicit_schedule checks the values, in checked_run: it needs torch)."""
    try:
        return [float(p) for p in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma list of numbers such as 1.0,0.75,0.5,0.25,0") from None


def finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def step_cache_threshold(s: str) -> float:
    """--step-cache T: a finite number >= 0 (0: off)."""
    v = finite_float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{s!r} is negative: the step cache's threshold is a relative change >= 0")
    return v


def lora_spec(s: str) -> tuple[str, float]:
    """--lora FILE[:STRENGTH] -> (FILE, STRENGTH); strength 1 without one. A last ':...' that is not a number
    belongs to the path."""
    path, sep, tail = s.rpartition(":")
    if sep and path:
        try:
            return path, finite_float(tail)
        except argparse.ArgumentTypeError:
            pass
    return s, 1.0


VARIANT_HELP = "flux-kontext-dev, flux-dev or flux-schnell: what a BFL file holds when its shapes leave it open"


def checkpoint_options(sp, variant_help: str = VARIANT_HELP) -> None:
    """Where the weights are: every command that loads a pipeline."""
    sp.add_argument("--checkpoint", required=True, help="diffusers folder or flux1-*.safetensors file")
    sp.add_argument("--ae", help="ae.safetensors for a BFL single file (default: beside it)")
    sp.add_argument("--text-encoders", help="folder with text_encoder*/ and tokenizer*/ (BFL files)")
    sp.add_argument("--variant", help=variant_help)


def load_options(sp, device_help: str = "cuda if available") -> None:
    """How the pipeline loads and how fast it runs: Pipeline.from_pretrained's device, dtype, backend, placement,
    VAE tiling, optimize= and loras=, the same on every command that loads one (edit, generate, demo, serve)."""
    sp.add_argument("--device", help=f"cpu, cuda, cuda:1 (default: {device_help})")
    sp.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="default: bf16 on GPU, fp32 on CPU")
    sp.add_argument("--backend", default="auto", help="auto, eager, triton, tensorrt")
    sp.add_argument(
        "--engines", help="TensorRT engine folder from `kontext-rt export --out` (implies --backend tensorrt)"
    )
    sp.add_argument(
        "--placement",
        help="where each part lives: resident (default), lean, offload, or part=mode,... "
        "(text_encoders=device|staged|cpu, transformer=resident|offload, modulation=resident|staged, "
        "vae=resident|staged); `kontext-rt plan` shows what each needs",
    )
    sp.add_argument(
        "--vae-tiling",
        choices=["auto", "on", "off"],
        default="auto",
        help="encode/decode images over 1024 px in overlapping tiles: auto (when the GPU would not fit the "
        "untiled call), on, off",
    )
    g = sp.add_argument_group("speed options (Python: Pipeline.from_pretrained's optimize= and loras=)")
    g.add_argument(
        "--fp8",
        choices=["dynamic", "static"],
        help="the blocks' large linears in FP8 e4m3 (lossy; needs --dtype bf16 and compute capability 8.9+): "
        "dynamic per-token scales, or static scales from --fp8-calibration",
    )
    g.add_argument("--fp8-calibration", metavar="FILE", help="the export stage's calibration file (--fp8 static)")
    g.add_argument(
        "--cuda-graphs", action="store_true", help="capture one denoising step per shape and replay it (CUDA)"
    )
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block (inductor)")
    g.add_argument("--compile-backend", metavar="NAME", help="torch.compile with this backend (implies --compile)")
    g.add_argument(
        "--no-hoist",
        action="store_true",
        help="compute each step's modulation inside the step (default: every step's, before the loop)",
    )
    g.add_argument(
        "--attention",
        choices=["auto", "sdpa", "fa3", "fa3-fp8"],
        default="auto",
        help="the triton backend's attention: auto (today sdpa), sdpa, fa3 (FlashAttention-3, bf16/fp16) or fa3-fp8 "
        "(lossy); fa3 needs --backend triton, a compute capability 9.0 GPU (sm_90a), head dim 128 and FA3 installed",
    )
    g.add_argument(
        "--lora",
        action="append",
        type=lora_spec,
        default=[],
        metavar="FILE[:STRENGTH]",
        help="fuse a LoRA (.safetensors) into the weights at STRENGTH (default 1), before FP8; repeatable",
    )


def optimize_kwargs(args) -> dict:
    """Optimizations' fields from the speed options."""
    return dict(
        hoist=not args.no_hoist,
        cuda_graphs=args.cuda_graphs,
        fp8=args.fp8,
        fp8_calibration=args.fp8_calibration,
        compile=args.compile_backend or args.compile,
        attention=args.attention,
    )


def speed_summary(optimize, loras) -> str:
    """The speed options a pipeline loads with, in a few words (the server's start line names them)."""
    parts = [f"fp8 {optimize.fp8}"] if optimize.fp8 else []
    parts += ["CUDA graphs"] if optimize.cuda_graphs else []
    if optimize.compile:
        parts.append(f"compiled ({'inductor' if optimize.compile is True else optimize.compile})")
    parts += [] if optimize.hoist else ["modulation per step"]
    parts += [] if optimize.attention == "auto" else [f"attention {optimize.attention}"]
    parts += [f"LoRA {Path(path).stem} x{strength:g}" for path, strength in loras]
    return ", ".join(parts) or "no speed options"


def check_writable(folder: Path, what: str):
    """Create and remove a file in `folder`: the only test of writability that root, ACLs and read-only mounts
    all answer truthfully."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".kontext-rt-", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{what}: cannot write in {folder} ({e.strerror or e})") from None


def write_atomically(out: Path, write: Callable[[Path], object]) -> None:
    """write(temporary path) beside out, then rename it to out: never a partial output file. The temporary name
    keeps out's extension (PIL picks the format from it)."""
    tmp = out.parent / f".{out.stem}.{secrets.token_hex(6)}.partial{out.suffix}"
    try:
        write(tmp)
        os.replace(tmp, out)
    except OSError as e:  # a full disk, a folder made read-only during the run: name the user's path
        raise UsageError(f"output {out}: cannot write it ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def stage_summary(report, label: str) -> str:
    names = [
        ("text_encode", "text encode"),
        ("vae_encode", "VAE encode"),
        ("denoise", "denoise"),
        ("vae_decode", "VAE decode"),
    ]
    parts = []
    for key, name in names:
        if key in report.timings:
            extra = " (cache hit)" if key == "text_encode" and report.text_cache_hit else ""
            if key == "denoise" and report.steps:
                extra = f" ({report.steps} steps, {report.timings[key] / report.steps * 1000:.1f} ms/step"
                if report.cached_steps:  # the step cache skipped some: say how many full transformer calls ran
                    extra += f", {report.model_calls} full model calls, {report.cached_steps} steps from the cache"
                extra += ")"
            parts.append(f"{name} {report.timings[key]:.2f} s{extra}")
    return f"{label} | " + " | ".join(parts) + f" | seed {report.seed}"


def quiet_libraries():
    """The application, not the library, decides what third-party packages print: only their errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
