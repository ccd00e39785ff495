"""`kontext-rt demo`: the shipped small Kontext edits a rendered scene over a few turns, on any machine.

Each turn edits the previous turn's output (the model's, not the exact answer), as a multi-turn editing session
does. The picture written has one row per turn: the turn's input, the model's output and the exact answer the
shapes task knows; the lines printed say what each turn asked, whether the output carries it out (the quality
harness's own test, kontext_rt.quality.metrics.edit_success) and how long each stage took.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

# A scene of colours and kinds the model saw in training, and four turns over it: (kind, shape, colour, direction)
SCENE = {
    "background": "white",
    "size": 64,
    "shapes": [
        {"kind": "circle", "colour": "red", "cell": [1, 1], "size": "large"},
        {"kind": "square", "colour": "blue", "cell": [2, 2], "size": "large"},
        {"kind": "triangle", "colour": "orange", "cell": [0, 3], "size": "large"},
    ],
}
TURNS = (
    ("remove", "triangle", None, None),
    ("background", None, "black", None),
    ("recolour", "circle", "purple", None),
    ("move", "square", None, "left"),
)
SCALE = 4  # the 64 px images are drawn 4x larger (nearest neighbour) in the picture
LABEL = 14  # px of caption above each row


def session(scene):
    """The demo's edits, each of the exact scene the turns before it leave: [(EditSample, exact target scene)]."""
    from kontext_rt.quality import shapes

    out = []
    for kind, shape, colour, direction in TURNS:
        sample = shapes.edit_of(scene, kind, shape, colour, direction)
        out.append(sample)
        scene = shapes.Scene.from_dict(sample.meta["target"])
    return out


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
    """What only the demo refuses, before anything is written: turn k runs with seed + k - 1."""
    from kontext_rt.cli_args import UsageError

    if args.seed is not None and args.seed + len(TURNS) - 1 > 2**64 - 1:
        raise UsageError(
            f"--seed: the demo's {len(TURNS)} turns use seed .. seed + {len(TURNS) - 1}: at most 2**64-{len(TURNS)}"
        )


def run_demo(args, out: Path, text_cache) -> int:
    """Load the shipped model, run the session, write the picture, print what happened."""
    import kontext_rt as krt
    from kontext_rt.cli import load_kwargs
    from kontext_rt.cli_args import stage_summary, write_atomically
    from kontext_rt.demo import small_kontext
    from kontext_rt.quality import metrics, shapes

    args.checkpoint = small_kontext()
    args.ae = args.text_encoders = None
    args.device = args.device or "cpu"
    samples = session(shapes.Scene.from_dict(SCENE))
    t0 = time.perf_counter()
    pipe = krt.Pipeline.from_pretrained(**load_kwargs(args, text_cache, None, plan_size=(64, 64)))
    loaded = time.perf_counter() - t0
    say = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e6
    say(
        f"demo: a small Kontext ({params:.1f}M-parameter transformer) trained on a synthetic shapes-editing task, "
        f"shipped in the package; loaded in {loaded:.2f} s ({pipe.device}, {str(pipe.dtype).removeprefix('torch.')})"
    )
    seed = 0 if args.seed is None else args.seed
    current, rows, right = samples[0].source, [], 0
    for turn, sample in enumerate(samples, 1):
        report = krt.RunReport()
        output = pipe.edit(
            current,
            sample.instruction,
            steps=args.steps,
            guidance=args.guidance,
            seed=seed + turn - 1,
            auto_resize=False,
            report=report,
        )
        done = metrics.edit_success(sample, output)
        kept = metrics.preservation(sample, output)["psnr"]
        right += done
        verdict = "done" if done else "NOT done"
        say(stage_summary(report, f'turn {turn} "{sample.instruction}": {verdict}, the rest {kept:.1f} dB from exact'))
        rows.append((f"{turn}. {sample.instruction}: input | output | exact", [current, output, sample.target]))
        current = output
    write_atomically(out, picture(rows).save)
    say(f"{right} of {len(samples)} edits carried out; wrote {out} (one row per turn: input, output, exact answer)")
    return 0


def _eval_parser(sub) -> None:
    from kontext_rt.cli_args import DTYPE_NAMES, finite_float, nonneg_int, positive_int
    from kontext_rt.quality.bar import SETTINGS
    from kontext_rt.quality.shapes import SPLITS

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
    e.add_argument("-o", "--output", help="write the full result as JSON here")


def _eval(args) -> int:
    """Everything checked before the model loads; the JSON written atomically."""
    import json

    import torch

    from kontext_rt import Pipeline
    from kontext_rt.cli_args import DTYPE_NAMES, UsageError, check_writable, write_atomically
    from kontext_rt.demo import small_kontext
    from kontext_rt.load_checks import check_device
    from kontext_rt.quality import bar, harness, metrics

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
    checkpoint = Path(args.checkpoint) if args.checkpoint else small_kontext()
    pipe = Pipeline.from_pretrained(
        checkpoint, device=args.device, dtype=getattr(torch, DTYPE_NAMES[args.dtype]), backend=args.backend
    )
    result = harness.score_split(
        pipe,
        args.split,
        args.n,
        sample_seed=args.seed + 1,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        drift_turns=args.turns,
        embed=metrics.scene_embedding,
    )
    result = {
        "checkpoint": str(checkpoint),
        "split": args.split,
        "dtype": args.dtype,
        "backend": args.backend,
        **result,
    }
    for line in summary(result):
        print(line)
    asked = {"split": args.split, "n": args.n, "sample_seed": args.seed + 1, "steps": args.steps, "seed": args.seed}
    if args.guidance is None and {**asked, "drift_turns": args.turns} == dict(bar.SETTINGS):
        under = bar.failures(result)
        result["bar"] = {"passed": not under, "under": under}
        print("the bar (kontext_rt.quality.bar): " + ("passed" if not under else "FAILED: " + "; ".join(under)))
    if out is not None:
        text = json.dumps(result, indent=1, allow_nan=False)
        write_atomically(out, lambda tmp: tmp.write_text(text))
    return 0


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
