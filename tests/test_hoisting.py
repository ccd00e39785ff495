"""Invariants hoisted out of the loop: the modulation table of every step equals the per-step computation.

With backend='triton' the conditioning and modulation linears are the row-invariant kernel, so the hoisted loop is
bit for bit the per-step loop (denoisers.PerStep over the model). With 'eager' they are torch's F.linear, whose
BLAS picks another algorithm for one row than for many: there the two are held to the habit-7 bound against a
float64 model. Then the few-step schedules (4 and 8 steps, shifted and unshifted) end to end against diffusers.
"""

import copy

import pytest
import torch

from kontext_rt import Pipeline
from kontext_rt.backends import resolve
from kontext_rt.kernels import row_linear
from kontext_rt.model.op_table import EAGER_OPS
from kontext_rt.model.rope import rope_table, sequence_ids
from kontext_rt.sampling.denoisers import Hoisted, PerStep
from kontext_rt.sampling.loop import Conditioning, denoise
from kontext_rt.sampling.schedule import schedule
from kontext_rt.weights.formats import detect

TRITON = resolve("triton", "cpu").ops


def conditioning(cfg, batch, txt_len, grids, dtype, gen):
    ctx_tokens = sum(r * c for r, c in grids[1:])
    cos, sin = rope_table(sequence_ids(txt_len, grids), cfg.axes_dim, cfg.theta)
    return Conditioning(
        ctx=torch.randn(batch, ctx_tokens, 64, generator=gen).to(dtype) if ctx_tokens else None,
        txt=torch.randn(batch, txt_len, cfg.context_in_dim, generator=gen).to(dtype),
        pooled=torch.randn(batch, cfg.vec_in_dim, generator=gen).to(dtype),
        guidance=torch.full((batch,), 2.5),
        cos=cos,
        sin=sin,
    )


@pytest.fixture(scope="module")
def model(kontext_dir):
    return detect(kontext_dir).load_transformer(torch.float32, "cpu")


@pytest.mark.parametrize("rows", [1, 2, 5, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_linear_is_row_invariant_and_accurate(seed, rows, dtype):
    x, w, b = torch.randn(40, 96).to(dtype), (torch.randn(200, 96) / 10).to(dtype), torch.randn(200).to(dtype)
    full = row_linear.row_linear(x, w, b)
    assert torch.equal(row_linear.row_linear(x[:rows], w, b), full[:rows])
    assert torch.equal(row_linear.row_linear(x[-rows:].contiguous(), w, b), full[-rows:])
    exact = x.double() @ w.double().T + b.double()
    torch_err = (torch.nn.functional.linear(x, w, b).double() - exact).abs().max()
    ulp = torch.finfo(dtype).eps * exact.abs().max()
    assert (full.double() - exact).abs().max() <= 2 * torch_err + ulp


def test_row_linear_checks_its_inputs():
    with pytest.raises(ValueError, match=r"w has shape \(8, 5\), expected \(\*, 4\)"):
        row_linear.row_linear(torch.ones(2, 4), torch.ones(8, 5))
    with pytest.raises(TypeError, match="w is torch.float16 but the other inputs are torch.float32"):
        row_linear.row_linear(torch.ones(2, 4), torch.ones(8, 4, dtype=torch.float16))


@pytest.mark.parametrize(
    "dtype, grids",
    [(torch.float32, [(2, 3), (3, 2)]), (torch.bfloat16, [(3, 3)])],
    ids=["fp32-two-contexts", "bf16-one-context"],
)
def test_hoisted_loop_equals_per_step_loop_bit_for_bit(model, dtype, grids):
    m = copy.deepcopy(model).to(dtype)
    gen = torch.Generator().manual_seed(1)
    cond = conditioning(m.cfg, 2, 5, grids, dtype, gen)
    x = torch.randn(2, grids[0][0] * grids[0][1], 64, generator=gen)
    sigmas = schedule(3, grids[0][0] * grids[0][1])

    def per_step(img, ctx, txt, pooled, t, g, cos, sin):
        return m(img, ctx, txt, pooled, t, g, cos, sin, TRITON)

    steps = sigmas[:-1, None].expand(-1, 2)
    table = m.modulation_table(steps, cond.guidance, cond.pooled, TRITON)
    for i in range(3):  # forward's one-step table, row for row
        assert torch.equal(table[i], m.modulation_table(steps[i : i + 1], cond.guidance, cond.pooled, TRITON)[0])
    want = denoise(PerStep(per_step, dtype), x, sigmas, cond)
    assert torch.equal(denoise(Hoisted(m, TRITON, dtype), x, sigmas, cond), want)


def test_hoisted_eager_table_within_float32_rounding(model):
    gen = torch.Generator().manual_seed(2)
    cond = conditioning(model.cfg, 1, 5, [(3, 3)], torch.float32, gen)
    steps = schedule(8, 9)[:-1, None]
    table = model.modulation_table(steps, cond.guidance, cond.pooled, EAGER_OPS)
    exact_model = copy.deepcopy(model).double()
    for i in range(8):
        per_step = model.modulation_table(steps[i : i + 1], cond.guidance, cond.pooled)[0]
        exact = exact_model.modulation_table(steps[i : i + 1], cond.guidance.double(), cond.pooled.double())[0]
        ulp = torch.finfo(torch.float32).eps * exact.abs().max()
        assert (table[i].double() - exact).abs().max() <= 2 * (per_step.double() - exact).abs().max() + ulp


def test_hoisting_switch_changes_nothing_with_triton(kontext_dir):
    args = dict(prompt="x", width=32, height=48, steps=3, seed=1, output="latent")
    from kontext_rt import Optimizations

    load = dict(backend="triton", max_sequence_length=8)  # the interpreter's attention is slow past a few tokens
    hoisted = Pipeline.from_pretrained(kontext_dir, **load).generate(**args)
    plain = Pipeline.from_pretrained(kontext_dir, **load, optimize=Optimizations(hoist=False))
    assert torch.equal(plain.generate(**args), hoisted)


# Bound: tests/float64_reference.py (within 2x diffusers' own float32 error of diffusers in float64)


@pytest.mark.parametrize("steps", [4, 8])
def test_few_step_shifted_edit_matches_diffusers(kontext_dir, steps):
    from diffusers import FluxKontextPipeline

    from tests.float64_reference import assert_float32_close, float64_pipeline, kontext_call
    from tests.test_pipeline import noise, picture

    ref = FluxKontextPipeline.from_pretrained(kontext_dir, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    h, w = 32, 48
    img, lat = picture(h, w, steps), noise(h, w, steps)
    ours = Pipeline.from_pretrained(kontext_dir).edit(
        img, "few steps", steps=steps, auto_resize=False, latents=lat, output="latent"
    )
    args = kontext_call(img, "few steps", h, w, num_inference_steps=steps)
    want = ref(latents=lat, **args).images
    want64 = float64_pipeline(FluxKontextPipeline, kontext_dir)(latents=lat.double(), **args).images
    assert_float32_close(ours, want, want64, f"{steps}-step edit")


@pytest.mark.parametrize("steps", [4, 8])
def test_few_step_unshifted_generate_matches_diffusers(schnell_dir, steps):
    from diffusers import FluxPipeline

    from tests.float64_reference import assert_float32_close, float64_pipeline
    from tests.test_pipeline import noise

    pipe = Pipeline.from_pretrained(schnell_dir)
    assert not pipe.variant.shift_schedule
    flux = FluxPipeline.from_pretrained(schnell_dir, local_files_only=True)
    flux.set_progress_bar_config(disable=True)
    h, w = 32, 32
    lat = noise(h, w, 10 + steps)
    ours = pipe.generate("fast", width=w, height=h, steps=steps, latents=lat, output="latent")
    args = dict(
        prompt="fast",
        height=h,
        width=w,
        num_inference_steps=steps,
        guidance_scale=0.0,
        output_type="latent",
        max_sequence_length=256,
    )
    want = flux(latents=lat, **args).images
    want64 = float64_pipeline(FluxPipeline, schnell_dir)(latents=lat.double(), **args).images
    assert_float32_close(ours, want, want64, f"{steps}-step schnell generate")
