"""FP8 linears: quantize/dequantize math against float64, the fused Triton quantizer against torch's cast, the
_scaled_mm product against a float64 product of the dequantized operands, and the layer selection and static scales
against the export stage's ModelOpt recipe and calibration files."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from kontext_rt import Optimizations, Pipeline
from kontext_rt.errors import CheckpointError
from kontext_rt.kernels import fp8_quant
from kontext_rt.model import fp8_linear as f8
from kontext_rt.weights.formats import detect

E4M3_GRID = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
E4M3_GRID = E4M3_GRID[torch.isfinite(E4M3_GRID)].unique()


def rows_for_test(dtype, k=200):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, k, generator=gen) * torch.logspace(-3, 3, 9)[:, None]  # 6 decades of row magnitude
    x[3] = 0  # an all-zero row
    x[5, :7] = torch.tensor([1e-9, -1e-9, 3e3, -3e3, 0.0, 2.0**-10, 448.0])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_rows_is_nearest_e4m3_of_float64(dtype):
    x = rows_for_test(dtype)
    q, scale = f8.quantize_rows(x)
    amax = x.double().abs().amax(-1, keepdim=True)
    exact_scale = amax.clamp(min=f8.AMAX_FLOOR) / 448
    assert ((scale.double() - exact_scale).abs() <= torch.finfo(torch.float32).eps * exact_scale).all()
    v = (x.double() / scale.double()).clamp(-448, 448)  # what is rounded, exactly
    dist = (v[..., None] - E4M3_GRID).abs()
    nearest = E4M3_GRID[dist.argmin(-1)]
    # x / scale is formed in float32: a value within its rounding of a midpoint between two grid points may go
    # either way, every other must land on the nearest
    tie = (
        dist.topk(2, largest=False).values.diff(dim=-1).abs().squeeze(-1)
        <= 2 * torch.finfo(torch.float32).eps * v.abs()
    )
    assert torch.equal(q.double()[~tie], nearest[~tie])
    assert (q.double().abs().amax(-1)[amax.squeeze(-1) > 0] == 448).all()  # each row's largest maps to 448
    back = f8.dequantize(q, scale).double()
    assert ((back - x.double()).abs() <= x.double().abs() * 2**-4 + scale.double() * 2**-10).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [16, 200, 5000])
def test_triton_quantizer_is_torch_bit_for_bit(dtype, k):
    x = rows_for_test(dtype, k)
    q, scale = fp8_quant.quantize_rows(x)
    q_ref, scale_ref = f8.quantize_rows(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def _suite_parts():
    """The GPU suite's pieces (loaded by path): its FP8 tie rows are tested here, then checked on the device."""
    from tests import bench_scripts

    return bench_scripts.load("gpu/suite_parts.py")


def test_triton_quantizer_rounds_every_e4m3_tie_and_its_neighbours_as_torch_does():
    """Each row's amax is 448, so its scale is 1 and the quantizer rounds x itself: every e4m3 value, every
    midpoint between neighbours (ties, subnormals included), and the float32 values one ulp either side, of both
    signs, against torch's own cast."""
    x = _suite_parts().e4m3_tie_rows("cpu")  # the inputs the GPU run checks too
    # 127 non-negative e4m3 values, 126 midpoints and each one's two float32 neighbours, all kept beside the 448s
    assert x.shape[1] == 64 and (x[:, 0] == 448).all() and x[:, 1:].abs().unique().numel() >= 127 + 3 * 126
    q, scale = fp8_quant.quantize_rows(x)
    assert (scale == 1).all()
    assert torch.equal(q.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_triton_quantizer_reads_strided_rows():
    x = rows_for_test(torch.float32, 64)
    wide = torch.zeros(9, 100)
    wide[:, 10:74] = x
    q, scale = fp8_quant.quantize_rows(wide[:, 10:74])
    assert torch.equal(q.view(torch.uint8), f8.quantize_rows(x)[0].view(torch.uint8))


@pytest.mark.parametrize("matmul", ["_scaled_mm", "stand-in"])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_linear_is_the_product_of_its_dequantized_operands(static, matmul):
    """torch._scaled_mm, and the stand-in with its contract that CPU rehearsals use where torch lacks row-wise
    scales, against the float64 product of the same dequantized operands."""
    if matmul == "_scaled_mm" and not f8.rowwise_scaled_mm_works("cpu"):
        pytest.skip("this torch's CPU _scaled_mm takes per-tensor scales only (torch 2.11)")
    fn = torch._scaled_mm if matmul == "_scaled_mm" else f8.scaled_mm_dequantized
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(96, 48).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 96, generator=gen) * torch.logspace(-2, 1, 48)[:, None])
    x = torch.randn(2, 7, 96, generator=gen).to(torch.bfloat16)
    amax = x.float().abs().max() * 0.8 if static else None  # static scales clip the largest activations
    layer = f8.FP8Linear.from_linear(lin, input_amax=amax, matmul=fn)
    y = layer(x)
    x2 = x.reshape(-1, 96)
    if static:
        sx = (amax / 448).double()
        qx = f8.quantize_static(x2, layer.input_scale)
    else:
        qx, sx = f8.quantize_rows(x2)
    exact = (
        f8.dequantize(qx, sx).double() @ f8.dequantize(layer.weight, layer.weight_scale.T).double().T
        + lin.bias.double()
    ).reshape(2, 7, 48)
    assert y.shape == (2, 7, 48) and y.dtype == torch.bfloat16
    # the only rounding left is the bfloat16 output (and float32 accumulation): one bf16 ulp
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-6).all()


@pytest.fixture(scope="module")
def model(kontext_dir):
    return detect(kontext_dir).load_transformer(torch.bfloat16, "cpu")


def test_selection_and_static_scales_match_the_export_recipe(kontext_dir, model, tmp_path):
    """A real calibration file from the export stage (ModelOpt's recipe, a forward pass, save_calibration)."""
    pytest.importorskip("modelopt", reason="the export stage's calibration needs nvidia-modelopt (the export extra)")
    from kontext_rt.export import fp8 as export_fp8
    from tests.test_hoisting import conditioning

    m = copy.deepcopy(model).float()
    gen = torch.Generator().manual_seed(2)
    cond = conditioning(m.cfg, 1, 5, [(2, 2), (2, 2)], torch.float32, gen)
    x = torch.randn(1, 4, 64, generator=gen)

    def loop(mm):
        mm(x, cond.ctx, cond.txt, cond.pooled, torch.tensor([0.7]), cond.guidance, cond.cos, cond.sin)

    export_fp8.quantize(m, loop)
    fp = detect(kontext_dir).fingerprint()
    path = export_fp8.save_calibration(m, tmp_path / "amax.safetensors", fp)
    assert export_fp8.linear_layers(m) == {n: f8.fp8_eligible(n) for n in export_fp8.linear_layers(m)}
    amax = f8.read_calibration(path, fp)
    converted = f8.convert(copy.deepcopy(model), input_amax=amax)
    assert sorted(converted) == sorted(n for n, on in export_fp8.linear_layers(m).items() if on)
    layer = copy.deepcopy(model)
    f8.convert(layer, input_amax=amax)
    name = converted[0]
    want = amax[name].float().reshape(()) / 448
    assert torch.equal(layer.get_submodule(name).input_scale, want)
    with pytest.raises(CheckpointError, match="calibrated on another checkpoint"):
        f8.read_calibration(path, "0" * 32)
    partial = {k: v for k, v in amax.items() if k != name}
    with pytest.raises(CheckpointError, match="no input amax for 1 layers"):
        f8.convert(copy.deepcopy(model), input_amax=partial)
    save_file({"x": torch.ones(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a kontext-rt FP8 calibration file"):
        f8.read_calibration(tmp_path / "other.safetensors", fp)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_fp8_pipeline_runs_the_converted_layers(kontext_dir, backend):
    opts = Optimizations(fp8="dynamic")
    pipe = Pipeline.from_pretrained(
        kontext_dir, dtype=torch.bfloat16, backend=backend, optimize=opts, max_sequence_length=8
    )
    layers = [n for n, m in pipe.transformer.named_modules() if isinstance(m, f8.FP8Linear)]
    assert layers and all(f8.fp8_eligible(n) for n in layers)
    assert not any(
        f8.fp8_eligible(n) for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)
    )  # every eligible layer was converted
    out = pipe.generate("x", width=32, height=32, steps=2, seed=0, output="latent")
    bf16 = Pipeline.from_pretrained(kontext_dir, dtype=torch.bfloat16, max_sequence_length=8)
    ref = bf16.generate("x", width=32, height=32, steps=2, seed=0, output="latent")
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    with pytest.raises(ValueError, match="pass loras="):
        pipe.load_lora("any.safetensors")


def test_fp8_option_checks(kontext_dir):
    with pytest.raises(ValueError, match="load with dtype=torch.bfloat16"):
        Pipeline.from_pretrained(kontext_dir, optimize=Optimizations(fp8="dynamic"))
    with pytest.raises(ValueError, match="fp8 must be None or one of dynamic, static, got 'int8'"):
        Optimizations(fp8="int8").check(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="needs fp8_calibration"):
        Optimizations(fp8="static").check(torch.device("cpu"), torch.bfloat16)


def test_fp8_modes_are_given_as_strings_and_held_as_members():
    """The public API takes the strings; inside, Optimizations holds the Fp8Mode member (equal to its string)."""
    for mode in f8.Fp8Mode:
        for given in (mode.value, mode):
            opts = Optimizations(fp8=given, fp8_calibration="c.safetensors" if mode is f8.Fp8Mode.STATIC else None)
            assert opts.fp8 is mode and opts.fp8 == mode.value
            assert opts == Optimizations(fp8=mode.value, fp8_calibration=opts.fp8_calibration)
    assert Optimizations(fp8="int8").fp8 == "int8"  # left for check() to refuse, naming the modes
