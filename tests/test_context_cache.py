"""The context cache (kontext_rt/context_cache.py): an image edited again is not encoded again and gives the pixels
of a pipeline without the cache, bit for bit; with reuse_latents a turn's context tokens are the previous turn's
output latents, as an output="latent" run of the same turn gives them (a separate run: not the cached tensor); every
door takes the option and refuses bad values before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_rt import LoadSpec, Pipeline, Request, RunReport
from kontext_rt.context_cache import ContextCache
from kontext_rt.errors import InputError

ARGS = dict(steps=2, seed=5, auto_resize=False)


def picture(seed=0, size=(48, 32)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


class CountingVAE:
    """The pipeline's VAE, counting encodes."""

    def __init__(self, vae):
        self.inner, self.encodes = vae, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, x):
        self.encodes += 1
        return self.inner.encode(x)


class ContextRecorder:
    """The pipeline's denoiser, keeping the context tokens (cond.ctx) of every loop."""

    def __init__(self, inner):
        self.inner, self.dtype, self.contexts = inner, inner.dtype, []

    def prepare(self, sigmas, cond, x):
        self.contexts.append(cond.ctx.clone())
        return self.inner.prepare(sigmas, cond, x)


@pytest.fixture
def pipe(kontext_dir):
    p = Pipeline.from_pretrained(kontext_dir, max_sequence_length=8)
    p._vae_runner.vae = CountingVAE(p._vae_runner.vae)  # the runner's VAE: pipe.vae's setter would clear the cache
    return p


@pytest.fixture(scope="module")
def uncached(kontext_dir):
    return Pipeline.from_pretrained(kontext_dir, max_sequence_length=8, context_cache_size=0)


def encodes(pipe) -> int:
    return pipe._vae_runner.vae.encodes


def test_an_image_edited_twice_is_encoded_once_with_the_uncached_pixels(pipe, uncached):
    img = picture()
    reports = [RunReport(), RunReport()]
    outs = [pipe.edit(img, p, output="latent", report=r, **ARGS) for p, r in zip(("red", "blue"), reports, strict=True)]
    assert encodes(pipe) == 1
    assert [r.context_cache_hits for r in reports] == [0, 1]
    assert "vae_encode" in reports[1].timings  # the phase is still reported (the lookup)
    for p, out in zip(("red", "blue"), outs, strict=True):
        assert torch.equal(out, uncached.edit(img, p, output="latent", **ARGS))
    # an equal copy is the same content; one pixel changed, or another encode size, is another entry
    pipe.edit(img.copy(), "green", **ARGS)
    assert encodes(pipe) == 1
    changed = img.copy()
    changed.putpixel((0, 0), tuple(255 - v for v in img.getpixel((0, 0))))
    pipe.edit(changed, "green", **ARGS)
    pipe.edit(img.crop((0, 0, 32, 32)), "green", **ARGS)
    assert encodes(pipe) == 3 == pipe.context_cache.stats.misses


def test_size_zero_encodes_every_time(uncached):
    uncached._vae_runner.vae = CountingVAE(uncached._vae_runner.vae)
    try:
        for _ in range(2):
            uncached.edit(picture(), "red", **ARGS)
        assert encodes(uncached) == 2 and len(uncached.context_cache) == 0
    finally:
        uncached._vae_runner.vae = uncached._vae_runner.vae.inner


def test_least_recently_used_entries_go_first():
    cache = ContextCache(2)
    keys = [cache.key(picture(i), (48, 32)) for i in range(3)]
    for i, k in enumerate(keys[:2]):
        cache.put(k, "encoded", torch.full((1,), float(i)))
    assert cache.get(keys[0], "encoded") is not None  # keys[0] is now the most recent
    cache.put(keys[2], "encoded", torch.zeros(1))
    assert cache.get(keys[1], "encoded") is None and cache.get(keys[0], "encoded") is not None
    assert len(cache) == 2


def test_a_new_vae_empties_the_cache(pipe):
    pipe.edit(picture(), "red", **ARGS)
    assert len(pipe.context_cache) == 1
    pipe.vae = pipe.vae
    assert len(pipe.context_cache) == 0


def test_reuse_latents_gives_the_next_turn_the_previous_outputs_latents(pipe, kontext_dir):
    """Turn 2's context tokens are turn 1's latents (from a separate output="latent" run of turn 1), not an encode
    of turn 1's image; without reuse_latents they are the encode of that image (a cache-less pipeline's)."""
    img = picture(1)
    latents = pipe.edit(img, "red", output="latent", **ARGS)
    pipe.denoiser = rec = ContextRecorder(pipe.denoiser)
    session = pipe.session(img, reuse_latents=True, **ARGS)
    report = RunReport()
    session.edit("red")
    before = encodes(pipe)
    session.edit("blue", report=report)
    assert encodes(pipe) == before and report.reused_latents == 1 and report.context_cache_hits == 0
    assert torch.equal(rec.contexts[-1], latents.to(pipe.dtype))

    plain = Pipeline.from_pretrained(kontext_dir, max_sequence_length=8, context_cache_size=0)
    plain.denoiser = rec_plain = ContextRecorder(plain.denoiser)
    turns = plain.session(img, **ARGS)
    turns.edit("red")
    turns.edit("blue")
    assert np.array_equal(np.asarray(turns.history[1]), np.asarray(session.history[1]))  # turn 1: the same image
    encoded = plain._encode_context(turns.history[1], turns.history[1].size)
    assert torch.equal(rec_plain.contexts[-1], encoded)
    assert not torch.equal(encoded, rec.contexts[-1])  # the two ways differ: the test sees which one ran


def test_kept_latents_need_the_request_to_ask_and_the_sizes_to_match(pipe):
    img = picture(2)
    out = pipe.edit(img, "red", reuse_latents=True, **ARGS)
    report = RunReport()
    pipe.edit(out, "blue", report=report, **ARGS)  # without reuse_latents: the output's pixels are encoded
    assert report.reused_latents == 0
    cache = pipe.context_cache
    assert cache.get(cache.key(out, out.size), "kept") is not None
    assert cache.get(cache.key(out, (out.width, out.height - 16)), "kept") is None  # another encode size


def test_a_kept_output_is_found_by_its_pixels_after_a_png_round_trip(pipe, tmp_path):
    out = pipe.edit(picture(3), "red", reuse_latents=True, **ARGS)
    out.save(tmp_path / "out.png")
    report = RunReport()
    pipe.edit(tmp_path / "out.png", "blue", reuse_latents=True, report=report, **ARGS)
    assert report.reused_latents == 1


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_a_bad_reuse_latents_is_refused_before_any_work(pipe, bad):
    with pytest.raises(InputError, match="reuse_latents must be True or False"):
        pipe.edit(picture(), "red", reuse_latents=bad, **ARGS)
    with pytest.raises(InputError, match="reuse_latents must be True or False"):
        pipe.check(Request("red", (picture(),), reuse_latents=bad))
    assert encodes(pipe) == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_a_bad_cache_size_is_refused_before_the_weights(kontext_dir, bad):
    with pytest.raises(InputError, match="context_cache_size must be an integer >= 0"):
        LoadSpec(kontext_dir, context_cache_size=bad).check()
