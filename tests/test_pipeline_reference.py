"""Pipeline paths the parity tests do not reach, each against diffusers' FluxKontextPipeline on the same weights:
explicit sigmas, the default auto_resize=True (preferred Kontext resolutions, LANCZOS resize, normalisation), and
the text-embedding cache shared by checkpoints whose text encoders differ."""

import itertools
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from kontext_rt import Pipeline
from kontext_rt.image import PREFERRED_KONTEXT_RESOLUTIONS, context_size
from tests.float64_reference import assert_float32_close, float64_pipeline, kontext_call


def picture(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(kontext_dir):
    return Pipeline.from_pretrained(kontext_dir)


@pytest.fixture(scope="module")
def ref(kontext_dir):
    from diffusers import FluxKontextPipeline

    p = FluxKontextPipeline.from_pretrained(kontext_dir, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


# ---- explicit sigmas ----------------------------------------------------------------------------------------------

SIGMAS = [0.96, 0.8, 0.45, 0.1]  # uneven, below 1 at the start, no terminal 0 (one is appended)


def test_explicit_sigmas_are_used_as_given(kontext_dir, ref):
    """Sigmas given are not shifted: diffusers runs them unchanged with an unshifted scheduler (shift 1, no
    dynamic shifting), appending its terminal 0. Bound: tests/float64_reference.py. 8 text tokens keep the three
    runs (ours, diffusers in float32 and in float64) cheap."""
    from diffusers import FluxKontextPipeline

    pipe = Pipeline.from_pretrained(kontext_dir, max_sequence_length=8)

    unshifted = dict(shift=1.0, use_dynamic_shifting=False)
    flux = FluxKontextPipeline(
        **{**ref.components, "scheduler": type(ref.scheduler).from_config(ref.scheduler.config, **unshifted)}
    )
    flux.set_progress_bar_config(disable=True)
    flux64 = float64_pipeline(FluxKontextPipeline, kontext_dir, **unshifted)
    h, w = 32, 48
    img = picture(h, w)
    lat = torch.randn(1, (h // 16) * (w // 16), 64, generator=torch.Generator().manual_seed(7))
    steps = []
    ours = pipe.edit(
        img,
        "few steps",
        sigmas=SIGMAS,
        auto_resize=False,
        latents=lat,
        output="latent",
        progress=lambda i, n: steps.append((i, n)),
    )
    args = kontext_call(img, "few steps", h, w, sigmas=SIGMAS, max_sequence_length=8)
    want = flux(latents=lat, **args).images
    assert torch.equal(flux.scheduler.sigmas, torch.tensor(SIGMAS + [0.0]))  # diffusers did use them unchanged
    assert_float32_close(ours, want, flux64(latents=lat.double(), **args).images, "explicit sigmas")
    assert steps == [(i, len(SIGMAS)) for i in range(1, len(SIGMAS) + 1)]


def test_a_given_terminal_zero_is_not_doubled(pipe):
    """sigmas ending in 0 take one step per interval: the same steps, and the same result, as without the 0."""
    lat = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(8))
    runs = []
    for sigmas in (SIGMAS, SIGMAS + [0.0]):
        steps = []
        out = pipe.generate(
            "x",
            width=32,
            height=32,
            sigmas=sigmas,
            latents=lat,
            output="latent",
            progress=lambda i, n, steps=steps: steps.append(n),
        )
        runs.append((out, steps))
    (a, steps_a), (b, steps_b) = runs
    assert steps_a == steps_b == [len(SIGMAS)] * len(SIGMAS)
    assert torch.equal(a, b)


# ---- auto_resize (the default) -------------------------------------------------------------------------------------

# (width, height): square, landscape, portrait, odd sizes, sizes whose floor to 16 changes the aspect ratio
# (31x17 is 1.82 wide but 16x16 after flooring), extreme ratios beyond the list on both ends
SIZES = [
    (1000, 1000),
    (1920, 1080),
    (1080, 1920),
    (641, 479),
    (479, 641),
    (1023, 767),
    (97, 1531),
    (2000, 311),
    (31, 17),
    (47, 33),
    (16, 16),
    (1105, 943),
    (333, 517),
]


def test_preferred_resolutions_are_diffusers():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS as DIFFUSERS

    assert PREFERRED_KONTEXT_RESOLUTIONS == DIFFUSERS


class _Captured(Exception):
    pass


def diffusers_context_pixels(ref, img):
    """The context image's pixels as diffusers' FluxKontextPipeline prepares them by default (_auto_resize=True):
    caught at the end of its own preprocessing, before its VAE runs."""
    processor = ref.image_processor
    original = processor.preprocess

    def capture(*args, **kwargs):
        raise _Captured(original(*args, **kwargs))

    processor.preprocess = capture
    try:
        ref(
            image=img,
            prompt_embeds=torch.zeros(1, 4, 48),
            pooled_prompt_embeds=torch.zeros(1, 32),
            num_inference_steps=1,
            output_type="latent",
        )
    except _Captured as e:
        return e.args[0]
    finally:
        del processor.preprocess
    raise AssertionError("diffusers never preprocessed the context image")


def diffusers_size_choice(ref, img):
    """(width, height) diffusers resizes the context image to by default, caught when it calls its resize."""
    processor = ref.image_processor

    def capture(image, height, width, *args, **kwargs):
        raise _Captured((width, height))

    processor.resize = capture
    try:
        ref(
            image=img,
            prompt_embeds=torch.zeros(1, 4, 48),
            pooled_prompt_embeds=torch.zeros(1, 32),
            num_inference_steps=1,
            output_type="latent",
        )
    except _Captured as e:
        return e.args[0]
    finally:
        del processor.resize
    raise AssertionError("diffusers never resized the context image")


def ratio_boundary_sizes():
    """For each two neighbouring preferred aspect ratios a < b, the smallest size (multiples of 16) whose ratio lies
    between their harmonic and arithmetic means: nearer a by difference of ratios (diffusers' rule), nearer b by
    difference of inverse ratios, so only the right rule picks the right resolution."""
    ratios = sorted(w / h for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    sizes = []
    for a, b in itertools.pairwise(ratios):
        lo, hi = 2 * a * b / (a + b), (a + b) / 2
        for h in range(16, 8192, 16):
            w = math.ceil(lo * h / 16) * 16
            if lo < w / h < hi:
                sizes.append((w, h))
                break
    assert len(sizes) == len(ratios) - 1
    return sizes


def test_size_choice_at_ratio_boundaries_matches_diffusers(ref):
    for w, h in ratio_boundary_sizes():
        assert context_size(w, h, True) == diffusers_size_choice(ref, Image.new("RGB", (w, h))), (w, h)


class _Recorder:
    """Stands in for the pipeline's VAE: records the pixels it is given and stops the edit there."""

    def __init__(self):
        self.seen = None

    def encode(self, x):
        self.seen = x
        raise _Captured()


def test_default_auto_resize_matches_diffusers(pipe, ref, monkeypatch):
    """Size choice (aspect ratio of the floored size, nearest preferred resolution), LANCZOS resize and [-1, 1]
    normalisation, through the public edit call with its defaults: the VAE gets exactly diffusers' pixels."""
    recorder = _Recorder()
    monkeypatch.setattr(pipe, "vae", recorder)
    for i, (w, h) in enumerate(SIZES):
        img = picture(h, w, seed=i)
        want = diffusers_context_pixels(ref, img)
        with pytest.raises(_Captured):
            pipe.edit(img, "x", steps=1, seed=0)
        assert recorder.seen.shape == want.shape, (w, h)
        assert torch.equal(recorder.seen, want), (w, h)
        assert context_size(w, h, True) == (want.shape[3], want.shape[2])


# ---- the text-embedding cache shared by two checkpoints -----------------------------------------------------------


def _fine_tune_text_encoders(src, dst):
    """A copy of the checkpoint whose CLIP and T5 weights all differ (configs and tokenizers unchanged)."""
    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(9)
    for sub in ("text_encoder", "text_encoder_2"):
        for path in (dst / sub).glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as f:
                meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
            tensors = {
                k: v + 0.05 * torch.randn(v.shape, generator=gen).to(v.dtype) if v.is_floating_point() else v
                for k, v in tensors.items()
            }
            save_file(tensors, str(path), metadata=meta)
    return dst


def test_text_cache_keeps_checkpoints_apart(kontext_dir, tmp_path):
    """Two checkpoints that differ only in their text encoders share one cache folder: each gets its own
    encoders' embeddings, in the same process and in a fresh one (a disk hit)."""
    other = _fine_tune_text_encoders(kontext_dir, tmp_path / "other")
    cache = tmp_path / "cache"
    prompt = "make the sky green"
    first = {}
    for ckpt in (kontext_dir, other):
        p = Pipeline.from_pretrained(ckpt, text_cache_dir=cache)
        own = p.text.encode(prompt, p.max_sequence_length)  # this checkpoint's encoders, no cache
        first[ckpt] = own
        got = p.encode_prompt(prompt)
        assert all(torch.equal(g, o) for g, o in zip(got, own, strict=True)), ckpt
    assert not torch.equal(first[kontext_dir][0], first[other][0])  # the encoders really differ
    assert len(list(cache.glob("*.safetensors"))) == 2
    for ckpt in (other, kontext_dir):  # fresh pipelines: disk hits, each its own entry
        p = Pipeline.from_pretrained(ckpt, text_cache_dir=cache)
        got = p.encode_prompt(prompt)
        assert p.text_cache.stats.disk_hits == 1 and not p.text.loaded
        assert all(torch.equal(g, o) for g, o in zip(got, first[ckpt], strict=True)), ckpt
