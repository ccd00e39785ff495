"""Train a small FLUX.1 Kontext of the runtime's own architecture on the synthetic shapes task, on the CPU.

Two phases (phases.py): an autoencoder (kontext_rt.model.vae.AutoEncoder, VAE_CONFIG) on rendered
scenes for --vae-minutes (or one loaded by --vae-from, trained further for --vae-tune-minutes; --decoder-minutes
then trains its decoder alone, the latent space unchanged), then a transformer
(kontext_rt.model.transformer.FluxTransformer, flux_config) for --flux-minutes (or --flux-steps steps) with the
rectified-flow objective:
x_t = (1 - t) x_0 + t noise, target velocity noise - x_0, t = sigmoid(N(0, 1)), on edits (the source's packed latent
tokens as context, RoPE ids (1, r, c), as kontext_rt.model.rope.sequence_ids builds them) and on generation (no
context), unless --flux-minutes is 0 (--init-from's transformer as it is). The transformer trains on a pool of
train-split samples (data.py) encoded once by the trained VAE (--pool edits, a quarter as many
captions), drawn at random with replacement. Both phases decay their learning rate over their budget (cosine, after
a warm-up). --shape-weight weighs the reconstruction error on the shapes' pixels up (they are a few percent of
an image, and their colours are what most edits are about); --edit-weight weighs the flow loss on the tokens an edit
changes up (one or two of 16; all of them in a background edit). Text goes through the demo's tiny CLIP and T5
encoders (frozen, random, as write_diffusers_checkpoint writes them for --seed), so the result loads with
Pipeline.from_pretrained like any checkpoint; its T5 tokenizer states the MAX_SEQUENCE_LENGTH tokens it was trained
with, which the pipeline then reads by default.

    python -m kontext_toy.training.train --vae-minutes 12 --flux-minutes 80 --out /tmp/small-kontext

--device cuda trains on a GPU (the same code; float32 with TF32 matmuls), and --workers renders the pool's scenes
in that many processes (a GPU outruns one process drawing them). benchmarks/machine/gpu_run.py's opt-in `train` phase
runs it on the GPU machines.

The checkpoint (diffusers layout), train_log.json (seed, wall times, loss curves, the harness's scores, the
autoencoder's ceiling: the exact answers through the VAE alone, and the sha256 of the weights it started from and
wrote) and nothing else are written to --out. The seed fixes the data, the initial weights and the noise; the
number of steps a budget in minutes buys depends on the machine and its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from kontext_rt.cli_args import finite_float
from kontext_rt.model.transformer import FluxTransformer
from kontext_rt.model.vae import AutoEncoder
from kontext_toy import shapes
from kontext_toy.checkpoints import write_diffusers_checkpoint

# the script's own modules, beside it (python puts a script's folder first on sys.path)
from kontext_toy.training.data import MAX_SEQUENCE_LENGTH, SIZE, Stream, TextTable, build_pool, log
from kontext_toy.training.phases import (
    VAE_BATCH_EDITS,
    VAE_CONFIG,
    Budget,
    calibrate,
    flux_config,
    train_transformer,
    train_vae,
)


def evaluate(folder: Path, n: int, steps: int, seed: int, device: str = "cpu") -> dict:
    from kontext_rt.pipeline import Pipeline
    from kontext_toy.harness import score_split

    # eager, as every run's evaluation: scores comparable across machines and devices
    pipe = Pipeline.from_pretrained(folder, device=device, backend="eager", max_sequence_length=MAX_SEQUENCE_LENGTH)
    return {
        split: score_split(pipe, split, n, sample_seed=seed + 1, seed=seed, steps=steps, per_sample=False, size=SIZE)
        for split in shapes.SPLITS
    }


def load(folder: Path):
    """A checkpoint this script wrote, loaded once: (transformer, VAE)."""
    from kontext_rt.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(folder, backend="eager", max_sequence_length=MAX_SEQUENCE_LENGTH)
    return pipe.transformer, pipe.vae.eval().requires_grad_(False)


def write_final(folder: Path, model, vae, seed: int, text: TextTable) -> None:
    """The trained checkpoint, with a check that its rewritten text encoders are the ones trained with."""
    probe = "make the circle red"
    before = text.txt[text.ids([probe])[0]]
    write_diffusers_checkpoint(folder, model, vae, seed, MAX_SEQUENCE_LENGTH, trained_sizes=[(SIZE, SIZE)])
    after = TextTable(folder)
    if not torch.equal(before, after.txt[after.ids([probe])[0]]):
        raise RuntimeError("the rewritten text encoders differ from the ones trained with")


def weights_sha256(folder: Path, part: str) -> str:
    """sha256 of a part's weights (transformer or vae: the bytes of its safetensors files, in name order; of the one
    file, sha256sum's): the record names the checkpoints a run started from and the one it wrote, so a chain of runs
    can be followed link by link."""
    h = hashlib.sha256()
    for path in sorted((folder / part).glob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()


def write_log(folder: Path, record: dict) -> None:
    """train_log.json, with any non-finite loss written as null (strict JSON)."""

    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list):
            return [finite(v) for v in x]
        return x

    (folder / "train_log.json").write_text(json.dumps(finite(record), indent=1, allow_nan=False))


def kind_mix(text: str) -> dict[str, float]:
    """--kind-mix's value: "kind=weight,..." -> {kind: weight}, each an edit kind once, each weight positive."""
    mix = {}
    for item in text.split(","):
        kind, _, weight = item.partition("=")
        kind = kind.strip()
        if kind not in shapes.EDIT_KINDS or kind in mix:
            raise argparse.ArgumentTypeError(
                f"{kind!r}: each of {', '.join(shapes.EDIT_KINDS)} at most once, as kind=weight"
            )
        mix[kind] = finite_float(weight)  # names a weight that is no number, or not a finite one
        if mix[kind] <= 0:
            raise argparse.ArgumentTypeError(f"{item!r}: the weight must be positive")
    return mix


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae-minutes", type=float, default=12.0, help="wall-time budget of the autoencoder")
    p.add_argument(
        "--flux-minutes",
        type=float,
        help="wall-time budget of the transformer (default 80; 0, with --init-from: its transformer as it is)",
    )
    p.add_argument(
        "--flux-steps",
        type=int,
        help="instead of --flux-minutes: exactly this many transformer steps, whatever the machine and its load",
    )
    p.add_argument("--vae-from", type=Path, help="a checkpoint folder this script wrote: reuse its VAE, no phase 1")
    p.add_argument(
        "--init-from",
        type=Path,
        help="a checkpoint folder this script wrote: start from its transformer (and its VAE, unless --vae-from)",
    )
    p.add_argument(
        "--vae-tune-minutes",
        type=float,
        default=0.0,
        help="with --vae-from: train its VAE further (encoder and decoder) for this long, then recalibrate",
    )
    p.add_argument(
        "--decoder-minutes",
        type=float,
        default=0.0,
        help="after the VAE phase (or load): train the VAE's decoder alone this long; its encoder, and so the "
        "latents a transformer learnt, unchanged",
    )
    weights(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--skip",
        type=int,
        default=0,
        help="start the sample stream at train edit N (caption N/4); train_log.json's stream says what a run drew",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU: the same training, much faster)")
    p.add_argument("--workers", type=int, default=1, help="processes drawing the pool's scenes")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder (must not exist or be empty)")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32, help="samples per transformer step (3/4 edits, 1/4 captions)")
    p.add_argument("--pool", type=int, default=30000, help="edit samples encoded for the transformer phase")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=2, help="double-stream blocks")
    p.add_argument("--single", type=int, default=2, help="single-stream blocks")
    p.add_argument("--eval-n", type=int, default=30, help="samples per split for the final evaluation (0: none)")
    p.add_argument("--eval-steps", type=int, default=8)
    return p


def weights(p: argparse.ArgumentParser) -> None:
    """The arguments that weigh the losses and the draw."""
    p.add_argument(
        "--shape-weight",
        type=float,
        default=0.0,
        help="extra reconstruction weight on the shapes' pixels in the VAE phases (0: plain MSE)",
    )
    p.add_argument(
        "--edit-weight",
        type=float,
        default=0.0,
        help="extra flow-loss weight on the target tokens an edit changes (0: every token alike)",
    )
    p.add_argument(
        "--kind-mix",
        type=kind_mix,
        help="draw the pool's edits by kind in these proportions, e.g. recolour=3,move=2 (a kind not named: 1; "
        "default: every edit alike)",
    )


def autoencoder(args, vae, stream: Stream, cfg, curve: list) -> AutoEncoder:
    """Phase 1: the loaded VAE (vae), trained further for --vae-tune-minutes if asked, or a new one trained for
    --vae-minutes. A VAE trained here is written to --out as soon as it exists (with an untrained transformer)."""
    if vae is not None and args.vae_tune_minutes <= 0:
        return vae
    minutes = args.vae_minutes if vae is None else args.vae_tune_minutes
    vae = calibrate(train_vae(minutes, stream, args.vae_lr, curve, vae, args.shape_weight, args.device), stream)
    write_diffusers_checkpoint(args.out, FluxTransformer(cfg), vae.cpu(), args.seed, MAX_SEQUENCE_LENGTH)
    return vae.to(args.device)


def decoder(args, vae, stream: Stream, curve: list, record: dict) -> AutoEncoder:
    """--decoder-minutes: vae's decoder trained alone; the encoder, its calibration and so the pool's latents stay
    as they are."""
    t0, drawn = time.perf_counter(), stream.edits
    vae = train_vae(args.decoder_minutes, stream, args.vae_lr, curve, vae, args.shape_weight, args.device, True)
    record["decoder_seconds"] = round(time.perf_counter() - t0, 1)
    record["decoder_steps"] = (stream.edits - drawn) // VAE_BATCH_EDITS
    return vae


def transformer(args, cfg, vae, text: TextTable, stream: Stream, init, curve: list, record: dict):
    """Phase 2, (model, steps): a transformer (init's weights, if loaded) trained for args.flux on a pool encoded
    by vae, or with --flux-minutes 0 the loaded one as it is."""
    if not args.flux:
        return init, 0
    t0 = time.perf_counter()
    pool = build_pool(stream, vae, text, args.pool, args.pool // 4)
    record["pool_seconds"] = round(time.perf_counter() - t0, 1)
    return train_transformer(cfg, args.flux, pool, args.lr, args.batch, curve, init, args.edit_weight, args.kind_mix)


TEXT_ENCODER_FILES = ("text_encoder/model.safetensors", "text_encoder_2/model.safetensors")


def same_text_encoders(folder: Path, seed: int) -> bool:
    """Whether folder's text encoders are the ones this script writes for seed (it rewrites them into --out, and a
    transformer trained on other ones reads noise where its text was)."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        write_diffusers_checkpoint(Path(tmp), FluxTransformer(flux_config(32, 1, 1)), AutoEncoder(VAE_CONFIG), seed)
        for name in TEXT_ENCODER_FILES:
            mine, theirs = (load_file(Path(d) / name) for d in (tmp, folder))
            if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
                return False
    return True


def same_latents(a: AutoEncoder, b: AutoEncoder) -> bool:
    """Whether two VAEs encode an image to the same latents: the same encoder weights, scale and shift."""
    sa, sb = a.encoder.state_dict(), b.encoder.state_dict()
    same_scale = (a.cfg.scale_factor, a.cfg.shift_factor) == (b.cfg.scale_factor, b.cfg.shift_factor)
    return same_scale and sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def check(p: argparse.ArgumentParser, args) -> None:
    """The arguments, refused (p.error) before any work; --init-from implies --vae-from of the same folder."""
    if args.init_from is not None and args.vae_from is None:
        args.vae_from = args.init_from  # its latent space (moved by --vae-tune-minutes, which the transformer follows)
    if args.flux_steps is not None:
        if args.flux_minutes is not None:
            p.error("--flux-minutes and --flux-steps are two budgets for the one phase: give one")
        if args.flux_steps < 1:
            p.error("--flux-steps must be positive (--flux-minutes 0 keeps a loaded transformer as it is)")
        args.flux = Budget(steps=args.flux_steps)
    else:
        args.flux = Budget(minutes=80.0 if args.flux_minutes is None else args.flux_minutes)
        if args.flux.minutes < 0:
            p.error("--flux-minutes must not be negative")
    if args.vae_from is None and args.vae_minutes <= 0:
        p.error("--vae-minutes must be positive (or give --vae-from or --init-from)")
    if not args.flux and args.init_from is None:
        p.error("--flux-minutes 0 keeps a loaded transformer as it is: give --init-from")
    if not args.flux and args.vae_tune_minutes > 0:
        p.error("--flux-minutes 0 keeps the transformer, which would not read the latents --vae-tune-minutes moves")
    if not args.flux and args.edit_weight:
        p.error("--edit-weight weighs the transformer's loss, and --flux-minutes 0 trains no transformer")
    if not args.flux and args.kind_mix:
        p.error("--kind-mix draws the transformer's samples, and --flux-minutes 0 trains no transformer")
    if args.vae_tune_minutes > 0 and args.vae_from is None:
        p.error("--vae-tune-minutes trains a loaded VAE further: give --vae-from or --init-from")
    if min(args.shape_weight, args.edit_weight, args.vae_tune_minutes, args.decoder_minutes) < 0:
        p.error("--shape-weight, --edit-weight, --vae-tune-minutes and --decoder-minutes must not be negative")
    if args.shape_weight and args.vae_from is not None and args.vae_tune_minutes <= 0 and args.decoder_minutes <= 0:
        p.error(
            "--shape-weight weighs a VAE phase, and none runs: the VAE is loaded and --vae-tune-minutes and "
            "--decoder-minutes are 0"
        )
    if args.hidden % 32 or args.batch < 4 or args.pool < 1 or args.workers < 1 or args.skip < 0:
        p.error(
            "--hidden must be a multiple of 32, --batch at least 4, --pool and --workers positive, --skip not negative"
        )
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, not {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible here")
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out} is not empty")
    if args.init_from is not None:
        missing = [name for name in TEXT_ENCODER_FILES if not (args.init_from / name).is_file()]
        if missing:
            p.error(f"--init-from {args.init_from} has no {', '.join(missing)}: give a checkpoint this script wrote")
        if not same_text_encoders(args.init_from, args.seed):
            p.error(f"--init-from {args.init_from} was trained with other text encoders than --seed {args.seed} writes")


def loaded_models(p: argparse.ArgumentParser, args, cfg, record: dict):
    """(VAE, transformer) of --vae-from and --init-from (None where not given), refused (p.error) before --out is
    written when the transformer's architecture or, with --flux-minutes 0, the VAE's latents do not match."""
    loaded = vae = init = None
    if args.vae_from is not None:  # one load serves --vae-from and --init-from of the same folder
        loaded, vae = load(args.vae_from)
        record["vae_from"] = str(args.vae_from)
        record["vae_from_sha256"] = weights_sha256(args.vae_from, "vae")
    if args.init_from is not None:
        init, init_vae = (loaded, vae) if args.init_from == args.vae_from else load(args.init_from)
        record["init_from"] = str(args.init_from)
        record["init_from_sha256"] = weights_sha256(args.init_from, "transformer")
        if init.cfg != cfg:
            p.error(f"--init-from {args.init_from} holds another architecture than --hidden/--depth/--single")
        if not args.flux and not same_latents(vae, init_vae):
            p.error(
                f"--flux-minutes 0 keeps --init-from {args.init_from}'s transformer, and --vae-from {args.vae_from} "
                "encodes other latents than its VAE (encoder or scale differ)"
            )
    return vae, init


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    check(p, args)
    cfg = flux_config(args.hidden, args.depth, args.single)
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls (on some CPUs it would change results too)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    record = {"argv": sys.argv[1:] if argv is None else list(argv), "seed": args.seed, "threads": args.threads}
    record["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    record.update(size=SIZE, max_sequence_length=MAX_SEQUENCE_LENGTH, flux_config=dataclasses.asdict(cfg))
    log(f"seed {args.seed}, {args.threads} thread(s), {record['device']} -> {args.out}")
    vae, init = loaded_models(p, args, cfg, record)

    # the text encoders first: written by the same call (and seed) that writes the final checkpoint
    write_diffusers_checkpoint(args.out, FluxTransformer(cfg), AutoEncoder(VAE_CONFIG), args.seed, MAX_SEQUENCE_LENGTH)
    text = TextTable(args.out)
    stream = Stream(args.seed, args.workers, args.skip)

    vae_curve, decoder_curve, flux_curve = [], [], []
    if vae is not None:
        vae = vae.to(args.device)
    vae = autoencoder(args, vae, stream, cfg, vae_curve)
    record["vae_config"] = dataclasses.asdict(vae.cfg)
    record["vae_seconds"] = round(time.perf_counter() - start, 1)
    if args.decoder_minutes > 0:
        vae = decoder(args, vae, stream, decoder_curve, record)
    model, steps = transformer(args, cfg, vae, text, stream, init, flux_curve, record)
    record["train_seconds"] = round(time.perf_counter() - start, 1)
    # the train samples this run drew (VAE and decoder phases, pool): a later run's --skip past edits[1] sees only
    # new scenes
    record["stream"] = {"edits": [args.skip, stream.edits], "captions": [args.skip // 4, stream.gens]}
    record["flux_steps"] = steps
    record["vae_curve"], record["flux_curve"] = vae_curve, flux_curve
    if args.decoder_minutes > 0:
        record["decoder_curve"] = decoder_curve

    write_final(args.out, model, vae.cpu(), args.seed, text)
    record["written_sha256"] = {part: weights_sha256(args.out, part) for part in ("transformer", "vae")}
    write_log(args.out, record)  # now, and again after the evaluation: a failed evaluation keeps the training's
    if args.eval_n:
        t0 = time.perf_counter()
        record["eval"] = evaluate(args.out, args.eval_n, args.eval_steps, args.seed, args.device)
        record["eval_seconds"] = round(time.perf_counter() - t0, 1)
        record["eval_backend"] = "eager"
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_log(args.out, record)
    log(json.dumps({k: record[k] for k in ("seed", "train_seconds", "wall_seconds", "flux_steps")}))
    if "eval" in record:
        log(json.dumps(record["eval"], indent=1))
    diverged = [c for c in (vae_curve, decoder_curve, flux_curve) if c and not math.isfinite(c[-1][2])]
    return 1 if diverged else 0


if __name__ == "__main__":
    sys.exit(main())
