"""The shapes task's train samples for train.py: a stream of them in a fixed order (drawn in one or
more processes), and the pool the transformer trains on, encoded once by the VAE and the frozen text encoders."""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kontext_rt import image as im
from kontext_rt.model.vae import AutoEncoder
from kontext_toy import shapes

MAX_SEQUENCE_LENGTH = 64  # T5 tokens (the demo tokenizer: one per character; instructions need at most 31)
SIZE = 64  # px: 8x8 latent, 4x4 = 16 tokens per image, one per cell of the scene's grid


def log(msg: str) -> None:
    print(msg, flush=True)


def to_batch(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1]."""
    return torch.cat([im.to_tensor(img, *img.size) for img in images])


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


def changed_tokens(samples) -> torch.Tensor:
    """(B, L) bool: the target tokens an edit changes, from its exact pixel mask (EditSample.mask): a token covers
    16 x 16 px (8x down, 2x2 patches), one cell of the scene's grid, and counts as changed when over 5% of its pixels
    are in the mask. A recolour, removal or addition changes one token, a move two, a background edit all 16."""
    masks = torch.from_numpy(np.stack([s.mask for s in samples]).astype(np.float32))[:, None]
    return F.avg_pool2d(masks, 16).flatten(1) > 0.05


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
    """Train-split samples encoded once: edit (context, target, changed tokens, prompt id, kind) and generation
    (target, prompt id), on vae's device."""
    device = next(vae.parameters()).device
    ctx, tgt, changed, eid, kind, gen, gid = [], [], [], [], [], [], []
    t0 = time.perf_counter()
    for n, samples in enumerate(stream.take(edit_samples, n_edit, chunk)):
        x = to_batch([s.source for s in samples] + [s.target for s in samples]).to(device)
        z = im.pack(vae.encode(x))
        ctx.append(z[: len(samples)])
        tgt.append(z[len(samples) :])
        changed.append(changed_tokens(samples).to(device))
        eid += text.ids([s.instruction for s in samples])
        kind += [shapes.EDIT_KINDS.index(s.kind) for s in samples]
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
        "kind": torch.tensor(kind, device=device),  # index into shapes.EDIT_KINDS
        "gen": torch.cat(gen),
        "gid": torch.tensor(gid, device=device),
        "txt": txt.to(device),
        "pooled": pooled.to(device),
    }
