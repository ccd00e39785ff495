"""`kontext-rt demo` and `kontext-rt eval`, added to the CLI through the "kontext_rt.commands" entry points (DEMO,
EVAL: kontext_rt.cli.Command). Importing this module imports no torch: every `kontext-rt` call builds the parser.

demo: the shipped small Kontext edits scenes it never saw: one held-out edit of each kind, then a short multi-turn
session in which each turn edits the previous turn's output (the model's, not the exact answer), as a user's session
does. The scenes are drawn from the shapes task's held-out split by a fixed draw (DRAW), neither picked for nor
against the model, so what it shows is typical of it. The picture written has one row per edit: its input, the
model's output and the exact answer; the lines printed say what each edit asked, whether the output carries it out
(the quality harness's own test, kontext_toy.metrics.edit_success), and the counts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

SPLIT = "heldout"  # colour x shape pairs the model never trained on
DRAW = 0  # the task's seed of every scene the demo edits; fixed, so every run shows the same scenes
SINGLE_KINDS = ("recolour", "move", "remove", "background", "add")  # one held-out single edit of each
SESSION_KINDS = ("recolour", "move", "background")  # a session's turns, from the next held-out draw
SCALE = 4  # the 64 px images are drawn 4x larger (nearest neighbour) in the picture
LABEL = 14  # px of caption above each row
EDITS = len(SINGLE_KINDS) + len(SESSION_KINDS)  # edit i (from 1) runs with seed + i - 1
STEPS = 8  # the default: the steps the model's scores were measured at (kontext_toy.bar.SETTINGS, tested)


def singles():
    """The demo's single edits: edit_sample(SPLIT, kind, DRAW, index 0) of each kind."""
    from kontext_toy import shapes

    return [shapes.edit_sample(SPLIT, kind, seed=DRAW, index=0) for kind in SINGLE_KINDS]


def session():
    """The demo's session: shapes.session(SPLIT, SESSION_KINDS, DRAW, index 1)."""
    from kontext_toy import shapes

    return shapes.session(SPLIT, SESSION_KINDS, seed=DRAW, index=1)


def picture(rows):
    """rows: [(caption, [input, output, exact])] -> one RGB image, a row per turn with its caption above."""
    from PIL import Image, ImageDraw

    side = rows[0][1][0].size[0] * SCALE
    gap = 4
    width = 3 * side + 4 * gap
    sheet = Image.new("RGB", (width, len(rows) * (side + LABEL + gap) + gap), (128, 128, 128))
    draw = ImageDraw.Draw(sheet)
    y = gap
    for caption, images in rows:
        draw.text((gap, y), caption, fill=(255, 255, 255))
        y += LABEL
        for i, img in enumerate(images):
            sheet.paste(img.resize((side, side), Image.NEAREST), (gap + i * (side + gap), y))
        y += side + gap
    return sheet


def check_demo(args) -> None:
    """What only the demo refuses, before anything is written: edit i runs with seed + i - 1."""
    from kontext_rt.cli_args import UsageError

    if args.seed is not None and args.seed + EDITS - 1 > 2**64 - 1:
        raise UsageError(f"--seed: the demo's {EDITS} edits use seed .. seed + {EDITS - 1}: at most 2**64-{EDITS}")


def run_demo(args, out: Path, text_cache) -> int:
    """Load the shipped model, run the single edits and the session, write the picture, print what happened."""
    import kontext_rt as krt
    from kontext_rt.cli import load_spec
    from kontext_rt.cli_args import stage_summary, write_atomically
    from kontext_toy import metrics
    from kontext_toy.checkpoints import small_kontext

    args.checkpoint = small_kontext()
    args.ae = args.text_encoders = None
    args.device = args.device or "cpu"
    t0 = time.perf_counter()
    pipe = krt.Pipeline.load(load_spec(args, text_cache, None, plan_size=(64, 64)))
    loaded = time.perf_counter() - t0
    say = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e6
    say(
        f"demo: a small Kontext ({params:.1f}M-parameter transformer) trained on a synthetic shapes-editing task, "
        f"shipped in the package; loaded in {loaded:.2f} s ({pipe.device}, {str(pipe.dtype).removeprefix('torch.')})"
    )
    say(f"the scenes: the task's {SPLIT} split (colour x shape pairs never trained on), draw {DRAW}")
    seed = 0 if args.seed is None else args.seed
    rows, done = [], {"single": 0, "session": 0}

    def edit(n, image, sample, part, label):
        report = krt.RunReport()
        output = pipe.edit(
            image,
            sample.instruction,
            steps=args.steps,
            guidance=args.guidance,
            seed=seed + n - 1,
            auto_resize=False,
            report=report,
            solver=args.solver,
            step_cache=args.step_cache,
        )
        ok = metrics.edit_success(sample, output)
        kept = metrics.preservation(sample, output)["psnr"]
        done[part] += ok
        verdict = "done" if ok else "NOT done"
        say(stage_summary(report, f'{label} "{sample.instruction}": {verdict}, the rest {kept:.1f} dB from exact'))
        rows.append((f"{label}. {sample.instruction}: input | output | exact", [image, output, sample.target]))
        return output

    for n, sample in enumerate(singles(), 1):
        edit(n, sample.source, sample, "single", f"edit {n}")
    turns = session()
    current = turns[0].source
    for turn, sample in enumerate(turns, 1):
        current = edit(len(SINGLE_KINDS) + turn, current, sample, "session", f"turn {turn}")
    write_atomically(out, picture(rows).save)
    say(
        f"{done['single']} of {len(SINGLE_KINDS)} single edits and {done['session']} of {len(turns)} session turns "
        f"carried out; wrote {out} (one row per edit: input, output, exact answer)"
    )
    say("more samples, scored: kontext-rt eval (docs/quality.md)")
    return 0


def _eval_parser(sub):
    from kontext_rt.cli_args import DTYPE_NAMES, finite_float, nonneg_int, positive_int
    from kontext_rt.sampling import SOLVERS
    from kontext_toy.bar import SETTINGS
    from kontext_toy.shapes import SPLITS

    e = sub.add_parser(
        "eval", help="score a checkpoint on the synthetic shapes-editing task (default: the shipped small Kontext)"
    )
    e.add_argument("--checkpoint", help="diffusers folder (default: the small Kontext shipped in the package)")
    e.add_argument(
        "--split", choices=SPLITS, default=SETTINGS["split"], help="heldout: colour x shape pairs never trained on"
    )
    e.add_argument(
        "--n", type=positive_int, default=SETTINGS["n"], help="samples, edit kinds and captions in turn (%(default)s)"
    )
    e.add_argument("--steps", type=positive_int, default=SETTINGS["steps"], help="denoising steps (%(default)s)")
    e.add_argument("--guidance", type=finite_float, help="guidance scale (default: the model's)")
    e.add_argument(
        "--seed",
        type=nonneg_int,
        default=SETTINGS["seed"],
        help="sample i runs with seed + i; samples: seed + 1 (%(default)s)",
    )
    e.add_argument(
        "--turns",
        type=nonneg_int,
        default=SETTINGS["drift_turns"],
        help="edit-then-undo turns per drift session (%(default)s)",
    )
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    e.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32")
    e.add_argument("--backend", default="eager", help="eager, triton, auto")
    e.add_argument("--solver", choices=SOLVERS, default="euler", help="the sampling solver (%(default)s)")
    e.add_argument("-o", "--output", help="write the full result as JSON here")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return e


def _eval(args) -> int:
    """Everything checked before the model loads; the JSON written atomically."""
    import torch

    from kontext_rt import Pipeline
    from kontext_rt.cli import Progress
    from kontext_rt.cli_args import DTYPE_NAMES
    from kontext_toy import harness, metrics
    from kontext_toy.checkpoints import small_kontext

    out = _check_eval(args)
    checkpoint = Path(args.checkpoint) if args.checkpoint else small_kontext()
    pipe = Pipeline.from_pretrained(
        checkpoint, device=args.device, dtype=getattr(torch, DTYPE_NAMES[args.dtype]), backend=args.backend
    )
    shown = Progress(args.quiet, "eval", "sample")
    try:
        result = harness.score_split(
            WithSolver(pipe, args.solver),
            args.split,
            args.n,
            sample_seed=args.seed + 1,
            seed=args.seed,
            steps=args.steps,
            guidance=args.guidance,
            drift_turns=args.turns,
            embed=metrics.scene_embedding,
            progress=shown,
        )
    finally:
        shown.close()
    result = {"checkpoint": str(checkpoint), "split": args.split, "dtype": args.dtype, "backend": args.backend,
              "solver": args.solver, **result}  # fmt: skip
    _report(args, result, out)
    return 0


def _check_eval(args) -> Path | None:
    """eval's own checks, before the model loads: the output file, the seed range, the device."""
    from kontext_rt.cli_args import UsageError, check_writable
    from kontext_rt.load_checks import check_device

    out = Path(args.output) if args.output else None
    if out is not None:
        if out.suffix.lower() != ".json" or not out.parent.is_dir() or out.is_dir():
            raise UsageError(f"output {out}: a .json file in a folder that exists")
        check_writable(out.parent, f"output {out}")
    if args.seed + args.n > 2**64 - 1:
        raise UsageError(
            "--seed: sample i runs with seed + i and the samples are drawn with seed + 1: at most 2**64-1-n"
        )
    check_device(args.device)
    return out


def _report(args, result: dict, out: Path | None) -> None:
    """Print the summary and, at the bar's settings, the bar's verdict; write the JSON when asked."""
    import json

    from kontext_rt.cli_args import write_atomically
    from kontext_toy import bar

    for line in summary(result):
        print(line)
    asked = {"split": args.split, "n": args.n, "sample_seed": args.seed + 1, "steps": args.steps, "seed": args.seed}
    if args.guidance is None and args.solver == "euler" and {**asked, "drift_turns": args.turns} == dict(bar.SETTINGS):
        under = bar.failures(result)
        result["bar"] = {"passed": not under, "under": under}
        print("the bar (kontext_toy.bar): " + ("passed" if not under else "FAILED: " + "; ".join(under)))
    if out is not None:
        text = json.dumps(result, indent=1, allow_nan=False)
        write_atomically(out, lambda tmp: tmp.write_text(text))


class WithSolver:
    """A pipeline whose edit and generate run with `solver` (the harness calls them without one)."""

    def __init__(self, pipe, solver: str):
        self.pipe, self.solver = pipe, solver

    def edit(self, *args, **kwargs):
        return self.pipe.edit(*args, solver=self.solver, **kwargs)

    def generate(self, *args, **kwargs):
        return self.pipe.generate(*args, solver=self.solver, **kwargs)

    def __getattr__(self, name):  # vae, device: what the harness reads besides edit and generate
        return getattr(self.pipe, name)


def summary(result: dict) -> list[str]:
    """A few lines of harness.evaluate's result."""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.0f}%"

    def db(x):
        return "n/a" if x is None else f"{x:.1f} dB"

    kinds = ", ".join(f"{k} {pct(v['success_rate'])} of {v['n']}" for k, v in result["per_kind"].items())
    lines = [
        f"edits carried out: {pct(result['edit_success_rate'])} of {result['n_edit']} ({kinds})",
        f"the rest of the image kept: {db(result['preservation_psnr'])} PSNR, SSIM "
        + ("n/a" if result["preservation_ssim"] is None else f"{result['preservation_ssim']:.3f}"),
        f"captions drawn: {pct(result['generation_success_rate'])} of {result['n_generate']}",
    ]
    if result["drift"]:
        lines.append("drift over edit-then-undo turns: " + ", ".join(db(x) for x in result["drift"]["psnr"]))
        if result["drift"]["cosine"]:
            cosines = ", ".join("n/a" if x is None else f"{x:.3f}" for x in result["drift"]["cosine"])
            lines.append(f"  scene embedding's cosine to the first image: {cosines}")
    if result.get("autoencoder"):
        ceiling = result["autoencoder"]
        kinds = ", ".join(f"{k} {pct(v['success_rate'])}" for k, v in ceiling["per_kind"].items())
        lines.append(
            f"the exact answers through the autoencoder alone: {pct(ceiling['edit_success_rate'])} ({kinds}), "
            f"kept {db(ceiling['preservation_psnr'])}: what an exact prediction of their latents would score"
        )
    return lines


class _Demo:
    """`kontext-rt demo`: edit, generate's options but the checkpoint (the shipped one); device cpu by default."""

    def add_parser(self, sub):
        from kontext_rt.cli import common_options

        d = sub.add_parser(
            "demo",
            help="the shipped small Kontext edits held-out scenes: 5 edits, a 3-turn session (CPU, no downloads)",
        )
        common_options(
            d,
            needs_checkpoint=False,
            seed_help="0; edit i uses seed + i - 1",
            device_help="cpu",
            steps_default=STEPS,
            sigmas=False,  # the demo's scenes are scored at its steps; --solver it takes
        )
        return d

    def run(self, args) -> int:
        from kontext_rt.cli import checked_run, text_cache_dir

        check_demo(args)
        out, cache_dir = checked_run(args, default_output="demo-output.png")
        return run_demo(args, out, text_cache_dir(args, cache_dir))


class _Eval:
    """`kontext-rt eval`: the quality harness on a checkpoint (default: the shipped small Kontext)."""

    def add_parser(self, sub):
        return _eval_parser(sub)

    def run(self, args) -> int:
        return _eval(args)


DEMO, EVAL = _Demo(), _Eval()
