"""End to end against diffusers' FluxKontextPipeline / FluxPipeline on the same tiny checkpoint (fp32, CPU)."""

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_rt import Pipeline, RunReport
from kontext_rt.image import PREFERRED_KONTEXT_RESOLUTIONS, context_size
from kontext_rt.sampling.schedule import explicit_schedule, schedule
from tests.float64_reference import assert_float32_close, float64_pipeline, kontext_call

# Bound (habit 7, tests/float64_reference.py): each run within twice diffusers' own float32 error of the same run
# by diffusers in float64 (float64 state too), and within three times that error of diffusers in float32. Measured:
# diffusers' float32 error ~1e-7 on these edits; the runtime ~8e-8 from either.


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def picture(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def noise(h, w, seed=0, batch=1):
    return torch.randn(batch, (h // 16) * (w // 16), 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pipe(kontext_dir):
    return Pipeline.from_pretrained(kontext_dir)


@pytest.fixture(scope="module")
def ref(kontext_dir):
    from diffusers import FluxKontextPipeline

    p = FluxKontextPipeline.from_pretrained(kontext_dir, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def ref64(kontext_dir):
    from diffusers import FluxKontextPipeline

    return float64_pipeline(FluxKontextPipeline, kontext_dir)


@pytest.mark.parametrize("steps,seq", [(28, 4096), (28, 15), (8, 1024), (4, 6000), (1, 256)])
def test_schedule_equals_diffusers(ref, steps, seq):
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    cfg = ref.scheduler.config
    mu = calculate_shift(seq, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    ref.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.equal(schedule(steps, seq), ref.scheduler.sigmas)


def test_unshifted_schedule_equals_schnell_scheduler(schnell_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(schnell_dir / "scheduler")
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
    assert torch.equal(schedule(4, 4096, shift=False), sched.sigmas)


def test_explicit_sigmas():
    assert explicit_schedule([1.0, 0.75, 0.5, 0.25]).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    for bad in ([], [1.0, 1.0], [0.5, 0.7], [1.5, 0.5], [float("nan")]):
        with pytest.raises(ValueError, match="sigmas"):
            explicit_schedule(bad)


@pytest.mark.parametrize("h,w,steps", [(48, 80, 4), (64, 32, 3)])
def test_edit_matches_diffusers(pipe, ref, ref64, h, w, steps):
    img, lat = picture(h, w), noise(h, w)
    ours = pipe.edit(img, "make it red", steps=steps, guidance=2.5, auto_resize=False, latents=lat, output="latent")
    args = kontext_call(img, "make it red", h, w, num_inference_steps=steps)
    want = ref(latents=lat, **args).images
    assert ours.shape == want.shape == lat.shape
    assert_float32_close(ours, want, ref64(latents=lat.double(), **args).images, f"edit {h}x{w}")


def test_edit_image_output_matches_diffusers(pipe, ref):
    h, w = 48, 80
    img, lat = picture(h, w, 1), noise(h, w, 1)
    ours = pipe.edit(img, "a cat", steps=2, auto_resize=False, latents=lat)
    want = ref(
        image=img,
        prompt="a cat",
        num_inference_steps=2,
        guidance_scale=2.5,
        latents=lat,
        max_area=h * w,
        _auto_resize=False,
        height=h,
        width=w,
    ).images[0]
    assert ours.size == want.size == (w, h)
    diff = np.abs(np.asarray(ours, np.int16) - np.asarray(want, np.int16))
    assert diff.max() <= 1  # uint8 rounding of values that agree to ~1e-6


def test_generate_matches_diffusers(pipe, ref, ref64):
    from diffusers import FluxPipeline

    names = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")
    flux, flux64 = (FluxPipeline(**{k: getattr(r, k) for k in names}) for r in (ref, ref64))
    flux.set_progress_bar_config(disable=True)
    flux64.set_progress_bar_config(disable=True)
    h, w = 32, 64
    lat = noise(h, w, 2)
    ours = pipe.generate("a red house", width=w, height=h, steps=3, guidance=3.5, latents=lat, output="latent")
    args = dict(
        prompt="a red house", height=h, width=w, num_inference_steps=3, guidance_scale=3.5, output_type="latent"
    )
    want = flux(latents=lat, **args).images
    assert_float32_close(ours, want, flux64(latents=lat.double(), **args).images, "generate")


def test_schnell_generate_matches_diffusers(schnell_dir):
    from diffusers import FluxPipeline

    ours_pipe = Pipeline.from_pretrained(schnell_dir)
    assert ours_pipe.variant.name == "flux-schnell" and ours_pipe.max_sequence_length == 256
    flux = FluxPipeline.from_pretrained(schnell_dir, local_files_only=True)
    flux.set_progress_bar_config(disable=True)
    h, w = 48, 32
    lat = noise(h, w, 3)
    ours = ours_pipe.generate("a boat", width=w, height=h, steps=4, latents=lat, output="latent")
    args = dict(
        prompt="a boat",
        height=h,
        width=w,
        num_inference_steps=4,
        guidance_scale=0.0,
        output_type="latent",
        max_sequence_length=256,
    )
    want = flux(latents=lat, **args).images
    want64 = float64_pipeline(FluxPipeline, schnell_dir)(latents=lat.double(), **args).images
    assert_float32_close(ours, want, want64, "schnell generate")


def test_two_context_images_match_manual_loop(pipe):
    """Context image i gets ids (i, r, c): check against a hand-written loop over the model."""
    from kontext_rt.image import pack, to_tensor
    from kontext_rt.model.rope import rope_table, sequence_ids

    a, b = picture(32, 48, 4), picture(48, 32, 5)
    lat = noise(32, 48, 4)
    ours = pipe.edit([a, b], "merge them", steps=2, auto_resize=False, latents=lat, output="latent")
    model = pipe.transformer
    ctx = torch.cat([pack(pipe.vae.encode(to_tensor(x, *x.size))) for x in (a, b)], 1)
    txt, pooled = pipe.encode_prompt("merge them")
    ids = sequence_ids(txt.shape[1], [(2, 3), (2, 3), (3, 2)])
    assert ids[-6:, 0].eq(2).all() and ids[-12:-6, 0].eq(1).all()
    cos, sin = rope_table(ids, model.cfg.axes_dim, model.cfg.theta)
    x, sig = lat.clone(), schedule(2, 6)
    with torch.no_grad():
        for i in range(2):
            v = model(x, ctx, txt, pooled, sig[i : i + 1], torch.tensor([2.5]), cos, sin)
            x = x + (sig[i + 1] - sig[i]) * v
    assert rel_err(ours, x) < 1e-6


def test_auto_resize_snaps_to_preferred_resolution():
    assert context_size(1000, 1000, True) == (1024, 1024)
    assert context_size(1920, 1080, True) == (1392, 752)
    assert context_size(50, 90, False) == (48, 80)
    for w, h in PREFERRED_KONTEXT_RESOLUTIONS:
        assert context_size(w, h, True) == (w, h)


def test_output_size_follows_context_and_overrides(pipe):
    img = picture(48, 80)
    assert pipe.edit(img, "x", steps=1, seed=0, auto_resize=False).size == (80, 48)
    assert pipe.edit(img, "x", steps=1, seed=0, auto_resize=False, width=32, height=64).size == (32, 64)


def test_seed_is_reproducible_and_reported(pipe):
    r1, r2 = RunReport(), RunReport()
    a = pipe.generate("x", width=32, height=32, steps=2, seed=5, output="latent", report=r1)
    b = pipe.generate("x", width=32, height=32, steps=2, seed=5, output="latent", report=r2)
    c = pipe.generate("x", width=32, height=32, steps=2, seed=6, output="latent")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert r1.seed == 5 and r1.steps == 2 and set(r1.timings) == {"text_encode", "denoise"}


def test_few_step_explicit_sigmas(pipe):
    lat = noise(32, 32, 6)
    a = pipe.generate("x", width=32, height=32, sigmas=[1.0, 0.75, 0.5, 0.25], latents=lat, output="latent")
    b = pipe.generate("x", width=32, height=32, sigmas=[1.0, 0.5], latents=lat, output="latent")
    assert a.shape == b.shape and not torch.equal(a, b)


def test_session_feeds_each_output_back(pipe):
    s = pipe.session(picture(48, 80), steps=1, seed=0, auto_resize=False)
    first = s.edit("make it red")
    second = s.edit("now blue")
    assert len(s.history) == 3 and s.history[1] is first and s.image is second
    direct = pipe.edit(first, "now blue", steps=1, seed=0, auto_resize=False)
    assert np.array_equal(np.asarray(direct), np.asarray(second))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt=""), "prompt must be a non-empty string"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(width=50), "width 50 is not a multiple of 16"),
        (dict(guidance="high"), "guidance must be a number"),
        (dict(seed=-1), "seed must be a non-negative integer"),
        (dict(output="png"), "output must be one of"),
        (dict(latents=torch.zeros(1, 7, 64)), r"latents must be packed noise of shape \[B, 4, 64\]"),
    ],
)
def test_bad_arguments(pipe, kwargs, match):
    args = dict(prompt="x", width=32, height=32, steps=1) | kwargs
    with pytest.raises(ValueError, match=match):
        pipe.generate(**args)


def test_bad_pipeline_options(kontext_dir):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        Pipeline.from_pretrained(kontext_dir, backend="fast")
    with pytest.raises(RuntimeError, match="backend 'tensorrt' needs a CUDA GPU"):
        Pipeline.from_pretrained(kontext_dir, backend="tensorrt")
    with pytest.raises(ValueError, match="dtype must be one of"):
        Pipeline.from_pretrained(kontext_dir, dtype=torch.int8)
    with pytest.raises(ValueError, match="path must be a checkpoint folder or file .* got None"):
        Pipeline.from_pretrained(None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            Pipeline.from_pretrained(kontext_dir, device="cuda")
