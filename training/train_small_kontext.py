"""Train a small FLUX.1 Kontext of the runtime's own architecture on the synthetic shapes task, on the CPU.

Two phases inside one wall-time budget (--minutes): an autoencoder (kontext_rt.model.vae.AutoEncoder, VAE_CONFIG
below) on rendered scenes, then a transformer (kontext_rt.model.transformer.FluxTransformer, FLUX_CONFIG) with the
rectified-flow objective: x_t = (1 - t) x_0 + t noise, target velocity noise - x_0, t = sigmoid(N(0, 1)), on edits
(the source's packed latent tokens as context, RoPE ids (1, r, c), as kontext_rt.model.rope.sequence_ids builds
them) and on generation (no context). Text goes through the demo's tiny CLIP and T5 encoders (frozen, random, as
write_diffusers_checkpoint writes them for --seed), so the result loads with Pipeline.from_pretrained like the demo
checkpoint; load it with max_sequence_length=MAX_SEQUENCE_LENGTH, the length it was trained with.

    python training/train_small_kontext.py --minutes 10 --out /tmp/small-kontext

The checkpoint (diffusers layout), train_log.json (seed, wall times, loss curves, the harness's scores) and nothing
else are written to --out. The number of steps a budget buys depends on the machine; the seed fixes the data order,
the initial weights and the noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
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
FLUX_CONFIG = FluxConfig(
    vec_in_dim=_TEXT.vec_in_dim,
    context_in_dim=_TEXT.context_in_dim,
    hidden_size=128,
    num_heads=4,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(4, 14, 14),
)
MAX_SEQUENCE_LENGTH = 64  # T5 tokens (the demo tokenizer: one per character; captions need up to ~56)
SIZE = 64  # px: 8x8 latent, 4x4 = 16 tokens per image
EDIT_BATCH, GEN_BATCH = 16, 4
VAE_BATCH = 16
GUIDANCE_RANGE = (1.0, 5.0)  # no guidance distillation here: drawn at random, so any guidance value is in range


def log(msg: str) -> None:
    print(msg, flush=True)


def to_batch(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1]."""
    return torch.cat([im.to_tensor(img, *img.size) for img in images])


class Stream:
    """Train-split samples in a fixed order: edit i has kind EDIT_KINDS[i % 5], every sample drawn from (seed, i)."""

    def __init__(self, seed: int):
        self.seed, self.edits, self.gens = seed, 0, 0

    def edit_batch(self, n: int):
        out = []
        for _ in range(n):
            kind = shapes.EDIT_KINDS[self.edits % len(shapes.EDIT_KINDS)]
            out.append(shapes.edit_sample("train", kind, self.seed, self.edits, SIZE))
            self.edits += 1
        return out

    def gen_batch(self, n: int):
        out = [shapes.gen_sample("train", self.seed, self.gens + i, SIZE) for i in range(n)]
        self.gens += n
        return out


def train_vae(deadline: float, stream: Stream, lr: float, curve: list) -> AutoEncoder:
    vae = AutoEncoder(VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    step, t0, window = 0, time.perf_counter(), []
    while time.perf_counter() < deadline:
        samples = stream.edit_batch(VAE_BATCH // 2)
        x = to_batch([s.source for s in samples] + [s.target for s in samples])
        mean = vae.encoder(x).chunk(2, dim=1)[0]
        rec = vae.decoder(mean)
        # reconstruction, plus a small pull of the latents toward 0 so their scale stays put
        loss = F.mse_loss(rec, x) + 1e-4 * mean.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        window.append(loss.item())
        if step % 25 == 0:
            curve.append([step, round(time.perf_counter() - t0, 1), float(np.mean(window))])
            log(f"vae step {step:5d}  {curve[-1][1]:7.1f} s  loss {curve[-1][2]:.5f}")
            window = []
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def calibrate(vae: AutoEncoder, stream: Stream) -> AutoEncoder:
    """The same weights with scale_factor and shift_factor making the latents zero-mean, unit-variance, as FLUX's
    VAE config does for its own latents."""
    samples = stream.edit_batch(32)
    mean = vae.encoder(to_batch([s.target for s in samples])).chunk(2, dim=1)[0]
    shift, std = round(mean.mean().item(), 4), mean.std().item()
    cfg = dataclasses.replace(vae.cfg, shift_factor=shift, scale_factor=round(1.0 / std, 4))
    out = AutoEncoder(cfg)
    out.load_state_dict(vae.state_dict())
    return out.eval().requires_grad_(False)


class TextTable:
    """The frozen text encoders' (txt, pooled) per prompt, computed once each."""

    def __init__(self, folder: Path):
        from kontext_rt.text import TextEncoders

        self.encoders = TextEncoders(folder, "cpu", torch.float32)
        self.table = {}

    def __call__(self, prompts):
        for p in prompts:
            if p not in self.table:
                self.table[p] = self.encoders.encode(p, MAX_SEQUENCE_LENGTH)
        txt = torch.cat([self.table[p][0] for p in prompts])
        pooled = torch.cat([self.table[p][1] for p in prompts])
        return txt, pooled


def flow_loss(model, vae, text, images, prompts, contexts, rope) -> torch.Tensor:
    with torch.no_grad():
        z = im.pack(vae.encode(to_batch(images)))
        ctx = None if contexts is None else im.pack(vae.encode(to_batch(contexts)))
    txt, pooled = text(prompts)
    b = z.shape[0]
    t = torch.sigmoid(torch.randn(b))
    noise = torch.randn_like(z)
    x_t = (1 - t)[:, None, None] * z + t[:, None, None] * noise
    guidance = torch.empty(b).uniform_(*GUIDANCE_RANGE)
    v = model(x_t, ctx, txt, pooled, t, guidance, *rope)
    return F.mse_loss(v, noise - z)


def train_transformer(deadline, stream, vae, text, lr, curve) -> FluxTransformer:
    model = FluxTransformer(FLUX_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    grid = (SIZE // 16, SIZE // 16)
    cfg = FLUX_CONFIG
    edit_rope = rope_table(sequence_ids(MAX_SEQUENCE_LENGTH, [grid, grid]), cfg.axes_dim, cfg.theta)
    gen_rope = rope_table(sequence_ids(MAX_SEQUENCE_LENGTH, [grid]), cfg.axes_dim, cfg.theta)
    step, t0, window = 0, time.perf_counter(), []
    while time.perf_counter() < deadline:
        edits = stream.edit_batch(EDIT_BATCH)
        gens = stream.gen_batch(GEN_BATCH)
        loss_e = flow_loss(
            model,
            vae,
            text,
            [s.target for s in edits],
            [s.instruction for s in edits],
            [s.source for s in edits],
            edit_rope,
        )
        loss_g = flow_loss(model, vae, text, [s.target for s in gens], [s.caption for s in gens], None, gen_rope)
        loss = (EDIT_BATCH * loss_e + GEN_BATCH * loss_g) / (EDIT_BATCH + GEN_BATCH)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        window.append((loss_e.item(), loss_g.item()))
        if step % 25 == 0:
            e, g = np.mean(window, axis=0)
            curve.append([step, round(time.perf_counter() - t0, 1), float(e), float(g)])
            log(f"flux step {step:5d}  {curve[-1][1]:7.1f} s  edit loss {e:.4f}  gen loss {g:.4f}")
            window = []
    return model.eval().requires_grad_(False)


def evaluate(folder: Path, n: int, steps: int, seed: int) -> dict:
    from kontext_rt.pipeline import Pipeline
    from kontext_rt.quality.harness import evaluate as harness_evaluate

    pipe = Pipeline.from_pretrained(folder, max_sequence_length=MAX_SEQUENCE_LENGTH)
    out = {}
    for split in shapes.SPLITS:
        samples = list(shapes.dataset(split, n, seed=seed + 1, size=SIZE))
        out[split] = harness_evaluate(pipe, samples, steps=steps, seed=seed, drift_turns=2, per_sample=False)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="wall-time budget of both training phases")
    p.add_argument("--vae-fraction", type=float, default=0.3, help="share of the budget for the autoencoder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder (must not exist or be empty)")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-n", type=int, default=30, help="samples per split for the final evaluation (0: none)")
    p.add_argument("--eval-steps", type=int, default=8)
    args = p.parse_args(argv)
    if args.minutes <= 0 or not 0 < args.vae_fraction < 1:
        p.error("--minutes must be positive and --vae-fraction in (0, 1)")
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out} is not empty")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    budget = 60.0 * args.minutes
    record = {"seed": args.seed, "threads": args.threads, "minutes": args.minutes, "size": SIZE}
    record["vae_config"] = dataclasses.asdict(VAE_CONFIG)
    record["flux_config"] = dataclasses.asdict(FLUX_CONFIG)
    record["max_sequence_length"] = MAX_SEQUENCE_LENGTH
    log(f"seed {args.seed}, {args.threads} thread(s), budget {args.minutes} min -> {args.out}")

    # the text encoders first: written by the same call (and seed) that writes the final checkpoint
    write_diffusers_checkpoint(args.out, FluxTransformer(FLUX_CONFIG), AutoEncoder(VAE_CONFIG), seed=args.seed)
    text = TextTable(args.out)
    stream = Stream(args.seed)

    vae_curve, flux_curve = [], []
    vae = train_vae(start + args.vae_fraction * budget, stream, args.vae_lr, vae_curve)
    vae = calibrate(vae, stream)
    record["vae_scale_shift"] = [vae.cfg.scale_factor, vae.cfg.shift_factor]
    record["vae_seconds"] = round(time.perf_counter() - start, 1)
    model = train_transformer(start + budget, stream, vae, text, args.lr, flux_curve)
    record["train_seconds"] = round(time.perf_counter() - start, 1)
    record["vae_curve"], record["flux_curve"] = vae_curve, flux_curve
    record["samples_seen"] = {"edits": stream.edits, "generations": stream.gens}

    probe = "make the circle red"
    before = text([probe])[0]
    write_diffusers_checkpoint(args.out, model, vae, seed=args.seed)
    after = TextTable(args.out)([probe])[0]
    if not torch.equal(before, after):
        raise RuntimeError("the rewritten text encoders differ from the ones trained with")
    if args.eval_n:
        t0 = time.perf_counter()
        record["eval"] = evaluate(args.out, args.eval_n, args.eval_steps, args.seed)
        record["eval_seconds"] = round(time.perf_counter() - t0, 1)
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "train_log.json").write_text(json.dumps(record, indent=1, allow_nan=False))
    log(json.dumps({k: record[k] for k in ("seed", "train_seconds", "wall_seconds", "samples_seen")}))
    if "eval" in record:
        log(json.dumps(record["eval"], indent=1))
    return 1 if flux_curve and not math.isfinite(flux_curve[-1][2]) else 0


if __name__ == "__main__":
    sys.exit(main())
