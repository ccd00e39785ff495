"""Train a small FLUX.1 Kontext of the runtime's own architecture on the synthetic shapes task, on the CPU.

Two phases: an autoencoder (kontext_rt.model.vae.AutoEncoder, VAE_CONFIG below) on rendered scenes for
--vae-minutes (or one loaded by --vae-from, trained further for --vae-tune-minutes), then a transformer
(kontext_rt.model.transformer.FluxTransformer, FLUX_CONFIG) for --flux-minutes with the rectified-flow objective:
x_t = (1 - t) x_0 + t noise, target velocity noise - x_0, t = sigmoid(N(0, 1)), on edits (the source's packed latent
tokens as context, RoPE ids (1, r, c), as kontext_rt.model.rope.sequence_ids builds them) and on generation (no
context). The transformer trains on a pool of train-split samples encoded once by the trained VAE (--pool edits, a
quarter as many captions), drawn at random with replacement. Both phases decay their learning rate over their time
budget (cosine, after a warm-up). --shape-weight weighs the reconstruction error on the shapes' pixels up (they are
a few percent of an image, and their colours are what most edits are about); --edit-weight weighs the flow loss on
the tokens an edit changes up (one or two of 16; all of them in a background edit). Text goes through the demo's
tiny CLIP and T5 encoders (frozen, random, as write_diffusers_checkpoint writes them for --seed), so the result
loads with Pipeline.from_pretrained like any checkpoint; its T5 tokenizer states the MAX_SEQUENCE_LENGTH tokens it
was trained with, which the pipeline then reads by default.

    python training/train_small_kontext.py --vae-minutes 12 --flux-minutes 80 --out /tmp/small-kontext

--device cuda trains on a GPU (the same code; float32 with TF32 matmuls), and --workers renders the pool's scenes
in that many processes (a GPU outruns one process drawing them). benchmarks/gpu_run.py's opt-in `train` phase
runs it on the GPU machines.

The checkpoint (diffusers layout), train_log.json (seed, wall times, loss curves, the harness's scores, and the
autoencoder's ceiling: the exact answers through the VAE alone) and nothing else are written to --out. The number of
steps a budget buys depends on the machine; the seed fixes the data, the initial weights and the noise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import math
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kontext_rt import image as im
from kontext_rt.config import PRESETS, FluxConfig, VAEConfig
from kontext_rt.demo import write_diffusers_checkpoint
from kontext_rt.model.rope import rope_table, sequence_ids
from kontext_rt.model.transformer import FluxTransformer
from kontext_rt.model.vae import AutoEncoder
from kontext_rt.quality import shapes

_TEXT = PRESETS["tiny"]  # the demo's text encoders fix the text widths: T5 48, CLIP pooled 32
# One norm group: GroupNorm with one channel per group (8 groups of 8 channels) subtracts each channel's mean over the
# image, so a flat colour field normalises to zero and the decoder cannot tell a red background from a blue one.
# scale_factor / shift_factor are set from the trained encoder's latents (calibrate).
VAE_CONFIG = VAEConfig(ch=8, ch_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=1)
MAX_SEQUENCE_LENGTH = 64  # T5 tokens (the demo tokenizer: one per character; instructions need at most 31)
SIZE = 64  # px: 8x8 latent, 4x4 = 16 tokens per image, one per cell of the scene's grid
VAE_BATCH = 32
GUIDANCE_RANGE = (1.0, 5.0)  # no guidance distillation here: drawn at random, so any guidance value is in range


def flux_config(hidden: int, depth: int, single: int) -> FluxConfig:
    heads = hidden // 32  # head dim 32: RoPE axes (4, 14, 14) as the tiny preset
    return FluxConfig(
        vec_in_dim=_TEXT.vec_in_dim,
        context_in_dim=_TEXT.context_in_dim,
        hidden_size=hidden,
        num_heads=heads,
        depth=depth,
        depth_single_blocks=single,
        axes_dim=(4, 14, 14),
    )


def log(msg: str) -> None:
    print(msg, flush=True)


def to_batch(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1]."""
    return torch.cat([im.to_tensor(img, *img.size) for img in images])


def cosine_lr(base: float, step: int, warmup: int, progress: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from base to base/20 as progress (0..1 of the budget) runs."""
    progress = min(max(progress, 0.0), 1.0)
    return base * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def edit_samples(seed: int, start: int, n: int) -> list:
    """Train-split edits start..start+n-1: edit i has kind EDIT_KINDS[i % 5], drawn from (seed, i)."""
    return shapes.sample_range("train", shapes.EDIT_KINDS, seed, SIZE, start, n)


def gen_samples(seed: int, start: int, n: int) -> list:
    return shapes.sample_range("train", (shapes.GEN_KIND,), seed, SIZE, start, n)


class Stream:
    """Train-split samples in a fixed order (edit_samples, gen_samples); `take` draws the next ones of a kind in
    `workers` processes, in the same order as one process would."""

    def __init__(self, seed: int, workers: int = 1, skip: int = 0):
        self.seed, self.edits, self.gens, self.workers = seed, skip, skip // 4, workers

    def edit_batch(self, n: int):
        out = edit_samples(self.seed, self.edits, n)
        self.edits += n
        return out

    def take(self, draw, n: int, chunk: int):
        """Chunks of the next n samples of `draw` (edit_samples or gen_samples), as lists, in order."""
        counter = "edits" if draw is edit_samples else "gens"
        first = getattr(self, counter)
        setattr(self, counter, first + n)
        starts = range(first, first + n, chunk)
        sizes = [min(chunk, first + n - s) for s in starts]
        if self.workers <= 1:
            yield from (draw(self.seed, s, k) for s, k in zip(starts, sizes, strict=True))
            return
        kinds = shapes.EDIT_KINDS if draw is edit_samples else (shapes.GEN_KIND,)
        job = functools.partial(shapes.sample_range, "train", kinds, self.seed, SIZE)  # importable by name
        # spawned, not forked: this process has threads (torch's, CUDA's), which a fork would copy mid-lock
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=context) as pool:
            yield from pool.map(job, starts, sizes)


def shape_weights(samples, weight: float) -> torch.Tensor:
    """(2B, 1, H, W) reconstruction weights for [sources..., targets...]: 1 + weight on the pixels of the shapes
    (grown by one pixel). Shapes cover a few percent of an image; with plain MSE the background outweighs them and the
    autoencoder learns their colours last."""
    scenes = [s.meta["source"] for s in samples] + [s.meta["target"] for s in samples]
    masks = [shapes.grow(shapes.Scene.from_dict(d).shapes_mask()) for d in scenes]
    return 1.0 + weight * torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]


def train_vae(minutes, stream, lr, curve, init=None, shape_weight=0.0, device="cpu") -> AutoEncoder:
    """An autoencoder trained for `minutes` (from `init`'s weights when given) on reconstruction: MSE weighted by
    shape_weights, plus a small pull of the latents toward 0 so their scale stays put."""
    vae = AutoEncoder(VAE_CONFIG if init is None else init.cfg)
    if init is not None:
        vae.load_state_dict(init.state_dict())
    vae.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    step, t0, window = 0, time.perf_counter(), []
    budget = 60.0 * minutes
    while (elapsed := time.perf_counter() - t0) < budget:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(lr, step, 100, elapsed / budget)
        samples = stream.edit_batch(VAE_BATCH // 2)
        x = to_batch([s.source for s in samples] + [s.target for s in samples]).to(device)
        mean = vae.encoder(x).chunk(2, dim=1)[0]
        rec = vae.decoder(mean)
        mse = F.mse_loss(rec, x)
        if shape_weight:
            w = shape_weights(samples, shape_weight).to(device)
            fit = (w * (rec - x).pow(2)).mean() / w.mean()
        else:
            fit = mse
        loss = fit + 1e-4 * mean.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        window.append(mse.item())
        if step % 50 == 0:
            m = float(np.mean(window))
            curve.append([step, round(time.perf_counter() - t0, 1), m, round(10 * math.log10(4 / m), 2)])
            log(f"vae step {step:5d}  {curve[-1][1]:7.1f} s  mse {m:.5f}  psnr {curve[-1][3]:.2f} dB")
            window = []
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def calibrate(vae: AutoEncoder, stream: Stream) -> AutoEncoder:
    """The same weights with scale_factor and shift_factor making the latents zero-mean, unit-variance, as FLUX's
    VAE config does for its own latents; on vae's device."""
    device = next(vae.parameters()).device
    samples = stream.edit_batch(64)
    mean = vae.encoder(to_batch([s.target for s in samples]).to(device)).chunk(2, dim=1)[0]
    shift, std = round(mean.mean().item(), 4), mean.std().item()
    cfg = dataclasses.replace(vae.cfg, shift_factor=shift, scale_factor=round(1.0 / std, 4))
    out = AutoEncoder(cfg)
    out.load_state_dict(vae.state_dict())
    return out.to(device).eval().requires_grad_(False)


class TextTable:
    """The frozen text encoders' (txt, pooled) per prompt, computed once each; prompts become indices."""

    def __init__(self, folder: Path):
        from kontext_rt.text import TextEncoders

        self.encoders = TextEncoders(folder, "cpu", torch.float32)
        self.index, self.txt, self.pooled = {}, [], []

    def ids(self, prompts) -> list[int]:
        out = []
        for p in prompts:
            if p not in self.index:
                txt, pooled = self.encoders.encode(p, MAX_SEQUENCE_LENGTH)
                self.index[p] = len(self.txt)
                self.txt.append(txt[0])
                self.pooled.append(pooled[0])
            out.append(self.index[p])
        return out

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack(self.txt), torch.stack(self.pooled)


@torch.no_grad()
def build_pool(stream: Stream, vae: AutoEncoder, text: TextTable, n_edit: int, n_gen: int, chunk: int = 64) -> dict:
    """Train-split samples encoded once: edit (context, target, prompt id) and generation (target, prompt id), on
    vae's device."""
    device = next(vae.parameters()).device
    ctx, tgt, changed, eid, gen, gid = [], [], [], [], [], []
    t0 = time.perf_counter()
    for n, samples in enumerate(stream.take(edit_samples, n_edit, chunk)):
        x = to_batch([s.source for s in samples] + [s.target for s in samples]).to(device)
        z = im.pack(vae.encode(x))
        ctx.append(z[: len(samples)])
        tgt.append(z[len(samples) :])
        changed.append(changed_tokens(samples).to(device))
        eid += text.ids([s.instruction for s in samples])
        if n % 50 == 0:
            log(f"pool: {n * chunk + len(samples)} / {n_edit} edits  {time.perf_counter() - t0:.0f} s")
    for samples in stream.take(gen_samples, n_gen, chunk):
        gen.append(im.pack(vae.encode(to_batch([s.target for s in samples]).to(device))))
        gid += text.ids([s.caption for s in samples])
    txt, pooled = text.tensors()
    log(f"pool: {n_edit} edits, {n_gen} captions, {len(text.index)} prompts in {time.perf_counter() - t0:.0f} s")
    return {
        "ctx": torch.cat(ctx),
        "tgt": torch.cat(tgt),
        "changed": torch.cat(changed),
        "eid": torch.tensor(eid, device=device),
        "gen": torch.cat(gen),
        "gid": torch.tensor(gid, device=device),
        "txt": txt.to(device),
        "pooled": pooled.to(device),
    }


def flow_loss(model, z, ctx, txt, pooled, rope) -> torch.Tensor:
    """(B, L) mean-square velocity error per target token."""
    b = z.shape[0]
    t = torch.sigmoid(torch.randn(b, device=z.device))
    noise = torch.randn_like(z)
    x_t = (1 - t)[:, None, None] * z + t[:, None, None] * noise
    guidance = torch.empty(b, device=z.device).uniform_(*GUIDANCE_RANGE)
    v = model(x_t, ctx, txt, pooled, t, guidance, *rope)
    return (v - (noise - z)).pow(2).mean(-1)


def changed_tokens(samples) -> torch.Tensor:
    """(B, L) bool: the target tokens an edit changes, from its exact pixel mask (EditSample.mask): a token covers
    16 x 16 px (8x down, 2x2 patches), one cell of the scene's grid, and counts as changed when over 5% of its pixels
    are in the mask. A recolour, removal or addition changes one token, a move two, a background edit all 16."""
    masks = torch.from_numpy(np.stack([s.mask for s in samples]).astype(np.float32))[:, None]
    return F.avg_pool2d(masks, 16).flatten(1) > 0.05


def edit_loss(err: torch.Tensor, changed: torch.Tensor, edit_weight: float) -> torch.Tensor:
    """Mean over the samples of each one's weighted mean of its token errors err (B, L): weight 1 + edit_weight on
    its changed tokens (B, L bool), 1 elsewhere, normalised per sample."""
    w = 1.0 + edit_weight * changed.to(err.dtype)
    return ((w * err).sum(1) / w.sum(1)).mean()


def train_transformer(cfg, minutes, pool, lr, batch, curve, init=None, edit_weight=0.0):
    """(model, steps). An edit sample's loss is the mean of its target tokens' errors weighted 1 + edit_weight on the
    tokens the edit changes (changed_tokens), 1 elsewhere: most edits change one or two of 16 tokens, and without
    the weight the loss is mostly about copying the context. Each sample's weights are normalised on their own, so
    a background edit (every token changed) weighs as much as a recolour."""
    device = pool["tgt"].device
    model = FluxTransformer(cfg)
    if init is not None:
        model.load_state_dict(init.state_dict())
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    n_edit, n_gen = batch * 3 // 4, batch - batch * 3 // 4
    grid = (SIZE // 16, SIZE // 16)
    edit_rope, gen_rope = (
        [t.to(device) for t in rope_table(sequence_ids(MAX_SEQUENCE_LENGTH, grids), cfg.axes_dim, cfg.theta)]
        for grids in ([grid, grid], [grid])
    )
    step, t0, window = 0, time.perf_counter(), []
    budget = 60.0 * minutes
    while (elapsed := time.perf_counter() - t0) < budget:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(lr, step, 200, elapsed / budget)
        e = torch.randint(len(pool["eid"]), (n_edit,), device=device)
        g = torch.randint(len(pool["gid"]), (n_gen,), device=device)
        pe, pg = pool["eid"][e], pool["gid"][g]
        err_e = flow_loss(model, pool["tgt"][e], pool["ctx"][e], pool["txt"][pe], pool["pooled"][pe], edit_rope)
        loss_g = flow_loss(model, pool["gen"][g], None, pool["txt"][pg], pool["pooled"][pg], gen_rope).mean()
        loss_e = err_e.mean()
        loss = (n_edit * edit_loss(err_e, pool["changed"][e], edit_weight) + n_gen * loss_g) / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        window.append(torch.stack([loss_e.detach(), loss_g.detach()]))  # read every 100 steps: no sync per step
        if step % 100 == 0:
            le, lg = torch.stack(window).mean(0).tolist()
            curve.append([step, round(time.perf_counter() - t0, 1), float(le), float(lg)])
            log(f"flux step {step:6d}  {curve[-1][1]:7.1f} s  edit loss {le:.4f}  gen loss {lg:.4f}")
            window = []
    return model.cpu().eval().requires_grad_(False), step


def evaluate(folder: Path, n: int, steps: int, seed: int, device: str = "cpu") -> dict:
    from kontext_rt.pipeline import Pipeline
    from kontext_rt.quality.harness import autoencoder_ceiling
    from kontext_rt.quality.harness import evaluate as harness_evaluate

    # eager, as every run's evaluation: scores comparable across machines and devices
    pipe = Pipeline.from_pretrained(folder, device=device, backend="eager", max_sequence_length=MAX_SEQUENCE_LENGTH)
    out = {}
    for split in shapes.SPLITS:
        samples = list(shapes.dataset(split, n, seed=seed + 1, size=SIZE))
        out[split] = harness_evaluate(pipe, samples, steps=steps, seed=seed, drift_turns=2, per_sample=False)
        out[split]["autoencoder"] = autoencoder_ceiling(pipe.vae, samples, device)
    return out


def load(folder: Path):
    """A checkpoint this script wrote, loaded once: (transformer, VAE)."""
    from kontext_rt.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(folder, backend="eager", max_sequence_length=MAX_SEQUENCE_LENGTH)
    return pipe.transformer, pipe.vae.eval().requires_grad_(False)


def write_final(folder: Path, model, vae, seed: int, text: TextTable) -> None:
    """The trained checkpoint, with a check that its rewritten text encoders are the ones trained with."""
    probe = "make the circle red"
    before = text.txt[text.ids([probe])[0]]
    write_diffusers_checkpoint(folder, model, vae, seed, MAX_SEQUENCE_LENGTH)
    after = TextTable(folder)
    if not torch.equal(before, after.txt[after.ids([probe])[0]]):
        raise RuntimeError("the rewritten text encoders differ from the ones trained with")


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae-minutes", type=float, default=12.0, help="wall-time budget of the autoencoder")
    p.add_argument("--flux-minutes", type=float, default=80.0, help="wall-time budget of the transformer")
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


def autoencoder(args, vae, stream: Stream, cfg, curve: list) -> AutoEncoder:
    """Phase 1: the loaded VAE (vae), trained further for --vae-tune-minutes if asked, or a new one trained for
    --vae-minutes. A VAE trained here is written to --out as soon as it exists (with an untrained transformer)."""
    if vae is not None and args.vae_tune_minutes <= 0:
        return vae
    minutes = args.vae_minutes if vae is None else args.vae_tune_minutes
    vae = calibrate(train_vae(minutes, stream, args.vae_lr, curve, vae, args.shape_weight, args.device), stream)
    write_diffusers_checkpoint(args.out, FluxTransformer(cfg), vae.cpu(), args.seed, MAX_SEQUENCE_LENGTH)
    return vae.to(args.device)


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


def check(p: argparse.ArgumentParser, args) -> None:
    """The arguments, refused (p.error) before any work; --init-from implies --vae-from of the same folder."""
    if args.init_from is not None and args.vae_from is None:
        args.vae_from = args.init_from  # its latent space (moved by --vae-tune-minutes, which the transformer follows)
    if args.flux_minutes <= 0 or (args.vae_from is None and args.vae_minutes <= 0):
        p.error("--flux-minutes and --vae-minutes must be positive")
    if args.vae_tune_minutes > 0 and args.vae_from is None:
        p.error("--vae-tune-minutes trains a loaded VAE further: give --vae-from or --init-from")
    if min(args.shape_weight, args.edit_weight, args.vae_tune_minutes) < 0:
        p.error("--shape-weight, --edit-weight and --vae-tune-minutes must not be negative")
    if args.shape_weight and args.vae_from is not None and args.vae_tune_minutes <= 0:
        p.error("--shape-weight weighs a VAE phase, and none runs: the VAE is loaded and --vae-tune-minutes is 0")
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
    loaded = vae = init = None
    if args.vae_from is not None:  # one load serves --vae-from and --init-from of the same folder
        loaded, vae = load(args.vae_from)
        record["vae_from"] = str(args.vae_from)
    if args.init_from is not None:
        init = loaded if args.init_from == args.vae_from else load(args.init_from)[0]
        record["init_from"] = str(args.init_from)
        if init.cfg != cfg:
            p.error(f"--init-from {args.init_from} holds another architecture than --hidden/--depth/--single")

    # the text encoders first: written by the same call (and seed) that writes the final checkpoint
    write_diffusers_checkpoint(args.out, FluxTransformer(cfg), AutoEncoder(VAE_CONFIG), args.seed, MAX_SEQUENCE_LENGTH)
    text = TextTable(args.out)
    stream = Stream(args.seed, args.workers, args.skip)

    vae_curve, flux_curve = [], []
    if vae is not None:
        vae = vae.to(args.device)
    vae = autoencoder(args, vae, stream, cfg, vae_curve)
    record["vae_config"] = dataclasses.asdict(vae.cfg)
    record["vae_seconds"] = round(time.perf_counter() - start, 1)
    pool = build_pool(stream, vae, text, args.pool, args.pool // 4)
    record["pool_seconds"] = round(time.perf_counter() - start - record["vae_seconds"], 1)
    model, steps = train_transformer(
        cfg, args.flux_minutes, pool, args.lr, args.batch, flux_curve, init, args.edit_weight
    )
    record["train_seconds"] = round(time.perf_counter() - start, 1)
    # the train samples this run drew (VAE phase and pool): a later run's --skip past edits[1] sees only new scenes
    record["stream"] = {"edits": [args.skip, stream.edits], "captions": [args.skip // 4, stream.gens]}
    record["flux_steps"] = steps
    record["vae_curve"], record["flux_curve"] = vae_curve, flux_curve

    write_final(args.out, model, vae.cpu(), args.seed, text)
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
    return 1 if flux_curve and not math.isfinite(flux_curve[-1][2]) else 0


if __name__ == "__main__":
    sys.exit(main())
