"""`kontext-rt`: edit and generate from the command line (plan and export: cli_prepare.py; serve: cli_serve.py).

Other packages add subcommands through the "kontext_rt.commands" entry points (a `Command`: the small Kontext's
`demo` and `eval` come from kontext_toy that way); this module never imports them by name.

The only place that reads the environment (the cache folder). Bad input (any KontextError, argparse's errors
included) is one `error: ...` line on stderr, exit status 2, no traceback and no output file; it is checked before
the checkpoint loads wherever it can be. Anything else is a bug: the traceback, a line saying so, exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from kontext_rt.cli_args import (
    DTYPE_NAMES,
    MAX_STEPS,
    VARIANT_HELP,
    Parser,
    UsageError,
    check_writable,
    checkpoint_options,
    finite_float,
    load_options,
    nonneg_int,
    optimize_kwargs,
    positive_int,
    quiet_libraries,
    sigmas_list,
    stage_summary,
    step_cache_threshold,
    steps_int,
    write_atomically,
)
from kontext_rt.cli_prepare import _export, _export_parser, _plan, _plan_parser
from kontext_rt.cli_serve import _serve, _serve_parser
from kontext_rt.errors import KontextError

EXIT_BUG, EXIT_USAGE = 1, 2
BUG_LINE = "error: internal error (a bug in kontext-rt): please report it with the traceback above"
EDIT_VARIANT = "flux-kontext-dev"  # what `edit` takes a checkpoint to be when its shapes leave it open


def default_cache_dir() -> Path:
    env = os.environ.get("KONTEXT_RT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kontext-rt"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kontext-rt")
    except PackageNotFoundError:
        return "unknown (not installed)"


COMMANDS = "kontext_rt.commands"  # the entry-point group of added subcommands


class Command(Protocol):
    """A subcommand another package adds (entry point group "kontext_rt.commands"). add_parser registers its parser
    on the subparsers and returns it; run(args) runs it and returns the exit status. Importing its module must be
    cheap (no torch): every `kontext-rt` call builds the parser."""

    def add_parser(self, subparsers) -> argparse.ArgumentParser: ...

    def run(self, args) -> int: ...


def _added_commands(sub) -> None:
    """Each installed Command's parser, in name order; one that cannot be imported is named on stderr and left out."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMANDS), key=lambda ep: ep.name):
        try:
            command = ep.load()
        except ImportError as e:
            print(f"warning: command {ep.name!r} ({ep.value}) left out: {_one_line(e)}", file=sys.stderr)
            continue
        command.add_parser(sub).set_defaults(added_command=command)


def common_options(
    sp,
    needs_checkpoint=True,
    seed_help="random, printed",
    device_help="cuda if available",
    steps_default=None,
    sigmas=True,
):
    """The options edit, generate and image-making added commands (demo) share (--sigmas where `sigmas`)."""
    if needs_checkpoint:
        checkpoint_options(sp, VARIANT_HELP + " (generate needs it; edit takes flux-kontext-dev)")
    sp.add_argument("-o", "--output", help="output image (.png, .jpg, .webp, ...); never one of the inputs")
    default_steps = steps_default or "the model's"
    steps_help = f"denoising steps, at most {MAX_STEPS} (default: {default_steps})"
    sp.add_argument("--steps", type=steps_int, default=steps_default, help=steps_help)
    if sigmas:
        sp.add_argument(
            "--sigmas",
            type=sigmas_list,
            help="explicit schedule, a comma list decreasing to 0 such as 1.0,0.75,0.5,0.25,0 (steps + 1 values)",
        )
    sp.add_argument(
        "--solver",
        default="euler",
        help="euler (default), or dpm++2m: DPM-Solver++ 2M, second order, one model call per step as Euler",
    )
    sp.add_argument("--guidance", type=finite_float, help="distilled guidance scale, 0 to 100")
    sp.add_argument("--seed", type=nonneg_int, help=f"noise seed, 0 to 2**64-1 (default: {seed_help})")
    sp.add_argument(
        "--step-cache",
        type=step_cache_threshold,
        metavar="T",
        help="skip a step's later blocks while the first block's residual changes by less than T (relative L1; "
        "lossy, e.g. 0.1; default off; eager/triton without CUDA graphs)",
    )
    load_options(sp, device_help)
    sp.add_argument("--cache-dir", help="text-embedding cache and demo files (default: ~/.cache/kontext-rt)")
    sp.add_argument("--no-text-cache", action="store_true", help="do not read or write the on-disk text cache")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar or timing summary")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="kontext-rt", description="FLUX.1 Kontext editing and FLUX.1 generation.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    e = sub.add_parser("edit", help="edit an image from an instruction")
    e.add_argument("image", help="the image to edit (PNG, JPEG or WebP); --extra-image adds more")
    e.add_argument("prompt", help='the instruction, e.g. "make the sky purple"')
    e.add_argument("--extra-image", action="append", default=[], help="another context image (repeatable)")
    e.add_argument("--width", type=positive_int, help="output width (default: the context's, after resizing)")
    e.add_argument("--height", type=positive_int, help="output height, like --width; at most 2048 px a side")
    e.add_argument("--no-auto-resize", action="store_true", help="keep the context size (floored to 16 px)")
    common_options(e)
    g = sub.add_parser("generate", help="text-to-image")
    g.add_argument("prompt", help='what to draw, e.g. "a red fox in snow"')
    size_help = "a multiple of 16, at most 2048 (default: 1024, or the size the checkpoint says it was trained at)"
    g.add_argument("--width", type=positive_int, help=size_help)
    g.add_argument("--height", type=positive_int, help=size_help)
    common_options(g)
    for sp in (e, g):
        sp.add_argument(
            "--sequence-parallel",
            type=positive_int,
            metavar="N",
            help="one run on N processes launched by `torchrun --nproc-per-node N $(which kontext-rt) ...`, each "
            "holding 1/N of the image tokens (N divides the attention heads: 24 -> 2, 3, 4, 6, 8, 12, 24); "
            "rank 0 writes the output",
        )
    _export_parser(sub)
    _plan_parser(sub)
    _serve_parser(sub)
    _added_commands(sub)
    return p


def _check_output(path: str | Path | None, inputs=()) -> Path:
    """The output path, refused before any work: unknown extension, missing or unwritable folder, an input."""
    from PIL import Image

    if not path:
        raise UsageError("an output file is required (-o OUT.png)")
    out = Path(path)
    if out.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"output {out}: unknown image extension {out.suffix!r} (use .png, .jpg, .webp)")
    if not out.parent.is_dir():
        raise UsageError(f"output {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise UsageError(f"output {out} is a folder")
    for src in inputs:
        if out.exists() and Path(src).exists() and os.path.samefile(out, src):
            raise UsageError(f"output {out} is the input image {src}: it would be overwritten; write to another file")
    check_writable(out.parent, f"output {out}")
    return out


def _device_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = DTYPE_NAMES[args.dtype] if args.dtype else ("bfloat16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, name)


def _variant(args, found) -> str | None:
    """The stated variant; for `edit` without one, flux-kontext-dev where the checkpoint (found) leaves it open (a
    BFL file of FLUX.1 [dev] shapes): the user asked for an edit. `generate` states nothing, so such a file needs
    --variant. The checkpoint's own word (a diffusers folder, schnell shapes) always wins over this fallback."""
    if args.variant is not None or args.command != "edit":
        return args.variant
    return found.variant(if_ambiguous=EDIT_VARIANT).name


def _show_warnings(*categories):
    """Warnings of these categories as one `warning: ...` line on stderr; others as Python prints them."""
    original = warnings.showwarning

    def show(message, cat, filename, lineno, file=None, line=None):
        if issubclass(cat, categories):
            print(f"warning: {_one_line(message)}", file=sys.stderr)
        else:
            original(message, cat, filename, lineno, file, line)

    for category in categories:
        warnings.simplefilter("always", category)
    warnings.showwarning = show


def _inputs(args):
    """(the context images, the checkpoint found), read and checked before any weights, in the order a user fixes
    them: the images (and, without auto-resize, their sizes), then the checkpoint, whose model_index.json may name
    the sizes auto-resize snaps to. Each context is (RGB image, its size, the size it is encoded at)."""
    from kontext_rt import image as im
    from kontext_rt.weights.formats import detect

    paths = [args.image, *args.extra_image] if args.command == "edit" else []
    pils = [im.load_image(path) for path in paths]
    auto = not getattr(args, "no_auto_resize", False)
    if not auto:  # a side over 2048 px is refused before the checkpoint is read
        sizes = [im.context_size(*pil.size, False, name=f"image {path}") for path, pil in zip(paths, pils, strict=True)]
    found = detect(args.checkpoint, ae=args.ae, text_encoders=args.text_encoders)
    preferred = found.preferred_resolutions() or im.PREFERRED_KONTEXT_RESOLUTIONS
    if auto:
        sizes = [im.context_size(*pil.size, True, preferred=preferred) for pil in pils]
    contexts = [(pil, pil.size, size) for pil, size in zip(pils, sizes, strict=True)]
    if args.command == "generate":  # the checkpoint's default size where --width/--height leave it
        default = im.default_size(preferred)
        args.width, args.height = args.width or default[0], args.height or default[1]
    return contexts, found


def text_cache_dir(args, cache_dir: Path) -> Path | None:
    """The on-disk text cache folder, or None (with a warning) when it cannot be written: the run goes on."""
    if args.no_text_cache:
        return None
    folder = cache_dir / "text"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        check_writable(folder, "text cache")
    except (OSError, UsageError) as e:
        print(f"warning: {_one_line(e)}; running without the on-disk text cache", file=sys.stderr)
        return None
    return folder


def checked_run(args, inputs=(), default_output: str | None = None) -> tuple[Path, Path]:
    """The checks of common_options' flags, before any weights: the device, the placement, the size, steps,
        guidance and seed, then the output path (never one of the inputs; default_output: a file name in the cache
        folder, made here, when -o is not given). Returns (the output path, the cache folder); text_cache_dir makes the
    text cache's folder in it when the run gets to loading."""
    from kontext_rt import arguments

    if args.device is not None:
        from kontext_rt.load_checks import check_device

        check_device(args.device)  # before anything is written (a default output makes the cache folder)
    from kontext_rt.placement import Placement

    Placement.parse(args.placement)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    arguments.check(getattr(args, "width", None), getattr(args, "height", None), args.steps, args.guidance, args.seed)
    try:
        # checked here, not by argparse choices: the parser imports neither torch nor the runtime's internals
        arguments.check_solver(args.solver)
    except KontextError as e:
        raise UsageError(f"--solver: {e}") from None
    if getattr(args, "sigmas", None) is not None:
        try:
            args.sigmas = arguments.parse_sigmas(args.sigmas).tolist()  # a terminal 0 appended if absent
        except KontextError as e:
            raise UsageError(f"--sigmas: {e}") from None
        if args.steps is not None and args.steps != len(args.sigmas) - 1:
            raise UsageError(f"--steps {args.steps} disagrees with the {len(args.sigmas) - 1} steps of --sigmas")
    if not args.output and default_output:  # the default output goes in the cache folder, made here
        args.output = cache_dir / default_output
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cache folder {cache_dir}: cannot create it ({e.strerror or e})") from None
    return _check_output(args.output, inputs), cache_dir


def _run(args) -> int:
    from kontext_rt.errors import OutsideTrainedSize, PromptTruncated

    quiet_libraries()
    _show_warnings(PromptTruncated, OutsideTrainedSize)
    if args.command == "export":
        return _export(args)
    if args.command == "plan":
        return _plan(args)
    if args.command == "serve":
        return _serve(args)
    if getattr(args, "added_command", None) is not None:
        return args.added_command.run(args)
    inputs = [args.image, *args.extra_image] if args.command == "edit" else []
    with _process_group(args) as rank:
        out, cache_dir = checked_run(args, inputs)
        contexts, found = _inputs(args)
        img, report = _generate(args, contexts, found, text_cache_dir(args, cache_dir))
    if rank:  # the other ranks computed the same image: rank 0 writes it and speaks
        return 0
    write_atomically(out, img.save)
    if not args.quiet:
        label = f"{img.size[0]}x{img.size[1]} -> {out}"
        if contexts:
            label = "context " + ", ".join(f"{a[0]}x{a[1]} -> {b[0]}x{b[1]}" for _, a, b in contexts) + " | " + label
        print(stage_summary(report, label), file=sys.stderr)
    return 0


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def _process_group(args):
    """--sequence-parallel N: the torch.distributed process group of torchrun's N processes (gloo on the CPU, nccl
    on CUDA, each rank on the GPU of its local rank), this rank yielded, destroyed at the end; the ranks other than
    0 run quietly. Without the flag: nothing, rank None."""
    n = getattr(args, "sequence_parallel", None)
    if not n or n == 1:
        yield None
        return
    import torch
    import torch.distributed as dist

    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise UsageError(
            f"--sequence-parallel {n} runs under torchrun (no {', '.join(missing)} in the environment): "
            f"torchrun --nproc-per-node {n} $(which kontext-rt) {args.command} ..."
        )
    world, rank, local = (int(os.environ[v]) for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    if world != n:
        raise UsageError(f"--sequence-parallel {n} but torchrun started {world} processes: they must be equal")
    device, _ = _device_dtype(args)
    if device.startswith("cuda") and ":" in device:
        raise UsageError(
            f"--device {device} with --sequence-parallel {n} would put every rank on one GPU: give --device cuda, "
            "and each rank takes the GPU of its local rank"
        )
    if device.startswith("cuda"):
        args.device = f"cuda:{local}"  # one GPU per rank
        torch.cuda.set_device(torch.device(args.device))
    args.quiet = args.quiet or rank != 0
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method="env://")
    try:
        yield rank
    finally:
        dist.destroy_process_group()


def _run_size(args, contexts) -> tuple[int, int]:
    """The output size of this run (what the memory plan is made for): the asked size, else the first context's."""
    width, height = getattr(args, "width", None), getattr(args, "height", None)
    if not contexts:
        return width, height
    encoded = contexts[0][2]
    return width or encoded[0], height or encoded[1]


VAE_TILING = {"auto": "auto", "on": True, "off": False}  # --vae-tiling -> Pipeline.from_pretrained's vae_tiling


def load_spec(args, text_cache_dir, variant, checkpoint=None, **extra):
    """The LoadSpec of the flags edit, generate, serve and added commands share (one place for every door).
    checkpoint: the checkpoint found already (detect), loaded without being found and read again."""
    from kontext_rt.load_spec import LoadSpec
    from kontext_rt.options import Optimizations

    device, dtype = _device_dtype(args)
    found = checkpoint is not None
    return LoadSpec(
        path=checkpoint if found else args.checkpoint,
        device=device,
        dtype=dtype,
        backend=args.backend,
        ae=None if found else args.ae,
        text_encoders=None if found else args.text_encoders,
        text_cache_dir=text_cache_dir,
        engines=args.engines,
        variant=variant,
        placement=args.placement,
        vae_tiling=VAE_TILING[args.vae_tiling],
        optimize=Optimizations(**optimize_kwargs(args)),
        loras=tuple(args.lora),
        **extra,
    )


def _generate(args, contexts, found, text_cache: Path | None):
    """Load the pipeline and run the command: the expensive part, after every check that can come first."""
    import kontext_rt as krt

    spec = load_spec(args, text_cache, _variant(args, found), checkpoint=found, plan_size=_run_size(args, contexts))
    pipe = krt.Pipeline.load(replace(spec, parallel=getattr(args, "sequence_parallel", None)))
    report = krt.RunReport()
    bar = Progress(args.quiet)
    common = dict(
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        progress=bar,
        report=report,
        solver=args.solver,
        sigmas=getattr(args, "sigmas", None),
        step_cache=args.step_cache,
    )
    try:
        if args.command == "generate":
            img = pipe.generate(args.prompt, width=args.width, height=args.height, **common)
        else:
            img = pipe.edit(
                [pil for pil, _, _ in contexts],
                args.prompt,
                width=args.width,
                height=args.height,
                auto_resize=not args.no_auto_resize,
                **common,
            )
    finally:  # an error after the first step starts on a line of its own
        bar.close()
    return img, report


class Progress:
    """A tqdm bar on stderr (denoising steps by default), created on the first call of (done, total)."""

    def __init__(self, quiet: bool, desc: str = "denoise", unit: str = "step"):
        self.quiet, self.bar, self.desc, self.unit = quiet, None, desc, unit

    def __call__(self, done: int, total: int):
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _one_line(message) -> str:
    return " ".join(str(message).split())


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with warnings.catch_warnings():
            return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except KontextError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        traceback.print_exc()
        print(BUG_LINE, file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
