"""The two training phases of train.py: the autoencoder on reconstruction, then the transformer on the
rectified-flow objective over the encoded pool (data.build_pool)."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from kontext_rt.config import PRESETS, FluxConfig, VAEConfig
from kontext_rt.model.rope import rope_table, sequence_ids
from kontext_rt.model.transformer import FluxTransformer
from kontext_rt.model.vae import AutoEncoder
from kontext_toy import shapes
from kontext_toy.training.data import MAX_SEQUENCE_LENGTH, SIZE, Stream, log, shape_weights, to_batch

_TEXT = PRESETS["tiny"]  # the demo's text encoders fix the text widths: T5 48, CLIP pooled 32
# One norm group: GroupNorm with one channel per group (8 groups of 8 channels) subtracts each channel's mean over the
# image, so a flat colour field normalises to zero and the decoder cannot tell a red background from a blue one.
# scale_factor / shift_factor are set from the trained encoder's latents (calibrate).
VAE_CONFIG = VAEConfig(ch=8, ch_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=1)
VAE_BATCH_EDITS = 16  # a VAE step's 32 images: the sources and targets of this many edits
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


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long a phase runs: wall minutes (the steps they buy depend on the machine and its load) or, with steps,
    exactly that many steps (the same steps whatever the machine and its load). The learning rate's cosine follows
    whichever it is."""

    minutes: float = 0.0
    steps: int = 0

    def __bool__(self) -> bool:  # any training at all
        return self.steps > 0 or self.minutes > 0

    def progress(self, step: int, elapsed: float) -> float:
        return step / self.steps if self.steps else elapsed / (60.0 * self.minutes)

    def left(self, step: int, elapsed: float) -> bool:
        return step < self.steps if self.steps else elapsed < 60.0 * self.minutes


def cosine_lr(base: float, step: int, warmup: int, progress: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from base to base/20 as progress (0..1 of the budget) runs."""
    progress = min(max(progress, 0.0), 1.0)
    return base * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(minutes, stream, lr, curve, init=None, shape_weight=0.0, device="cpu", decoder_only=False) -> AutoEncoder:
    """An autoencoder trained for `minutes` (from `init`'s weights when given) on reconstruction: MSE weighted by
    shape_weights, plus a small pull of the latents toward 0 so their scale stays put. decoder_only: init's encoder
    kept as it is (so the latent space, and a transformer trained on it, stay valid), its decoder trained to read
    those latents better."""
    vae = AutoEncoder(VAE_CONFIG if init is None else init.cfg)
    if init is not None:
        vae.load_state_dict(init.state_dict())
    vae.to(device).train().requires_grad_(True)
    trained = vae
    if decoder_only:
        vae.encoder.eval().requires_grad_(False)
        trained = vae.decoder
    opt = torch.optim.AdamW(trained.parameters(), lr=lr, weight_decay=0.0)
    step, t0, window = 0, time.perf_counter(), []
    budget = 60.0 * minutes
    while (elapsed := time.perf_counter() - t0) < budget:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(lr, step, 100, elapsed / budget)
        samples = stream.edit_batch(VAE_BATCH_EDITS)
        x = to_batch([s.source for s in samples] + [s.target for s in samples]).to(device)
        with torch.set_grad_enabled(not decoder_only):
            mean = vae.encoder(x).chunk(2, dim=1)[0]
        rec = vae.decoder(mean)
        mse = F.mse_loss(rec, x)
        if shape_weight:
            w = shape_weights(samples, shape_weight).to(device)
            fit = (w * (rec - x).pow(2)).mean() / w.mean()
        else:
            fit = mse
        loss = fit if decoder_only else fit + 1e-4 * mean.pow(2).mean()  # a fixed encoder's latents pull nothing
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        step += 1
        window.append(mse.item())
        if step % 50 == 0:
            m = float(np.mean(window))
            curve.append([step, round(time.perf_counter() - t0, 1), m, round(10 * math.log10(4 / m), 2)])
            phase = "decoder" if decoder_only else "vae"
            log(f"{phase} step {step:5d}  {curve[-1][1]:7.1f} s  mse {m:.5f}  psnr {curve[-1][3]:.2f} dB")
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


def flow_loss(model, z, ctx, txt, pooled, rope) -> torch.Tensor:
    """(B, L) mean-square velocity error per target token."""
    b = z.shape[0]
    t = torch.sigmoid(torch.randn(b, device=z.device))
    noise = torch.randn_like(z)
    x_t = (1 - t)[:, None, None] * z + t[:, None, None] * noise
    guidance = torch.empty(b, device=z.device).uniform_(*GUIDANCE_RANGE)
    v = model(x_t, ctx, txt, pooled, t, guidance, *rope)
    return (v - (noise - z)).pow(2).mean(-1)


def edit_loss(err: torch.Tensor, changed: torch.Tensor, edit_weight: float) -> torch.Tensor:
    """Mean over the samples of each one's weighted mean of its token errors err (B, L): weight 1 + edit_weight on
    its changed tokens (B, L bool), 1 elsewhere, normalised per sample."""
    w = 1.0 + edit_weight * changed.to(err.dtype)
    return ((w * err).sum(1) / w.sum(1)).mean()


def draw_edits(pool, n: int, kind_mix: dict | None = None) -> torch.Tensor:
    """n pool edits' indices, at random with replacement: each alike, or with kind_mix ({edit kind: weight}, a
    kind not named weighs 1) each edit of a kind drawn in proportion to its kind's weight."""
    if not kind_mix:
        return torch.randint(len(pool["eid"]), (n,), device=pool["eid"].device)
    weights = torch.tensor([kind_mix.get(k, 1.0) for k in shapes.EDIT_KINDS], device=pool["kind"].device)
    return torch.multinomial(weights[pool["kind"]], n, replacement=True)


def train_transformer(cfg, budget: Budget, pool, lr, batch, curve, init=None, edit_weight=0.0, kind_mix=None):
    """(model, steps), trained for budget. An edit sample's loss is the mean of its target tokens' errors weighted
    1 + edit_weight on the tokens the edit changes (changed_tokens), 1 elsewhere: most edits change one or two of 16
    tokens, and without the weight the loss is mostly about copying the context. Each sample's weights are normalised
    on their own, so a background edit (every token changed) weighs as much as a recolour. kind_mix: draw_edits."""
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
    while budget.left(step, elapsed := time.perf_counter() - t0):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(lr, step, 200, budget.progress(step, elapsed))
        e = draw_edits(pool, n_edit, kind_mix)
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
