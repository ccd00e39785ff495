"""Static FP8 linears against a float64 reference written here from the recipe alone, and a pipeline loaded with
fp8="static" against the calibration file it was given.

The recipe (OCP FP8 e4m3fn, max 448): weight scale per output row = row amax / 448, activation scale = the layer's
calibrated amax / 448; each operand divided by its scale, clamped to +-448 and rounded to the nearest e4m3 value;
y = (q_x * s_x) @ (q_w * s_w).T + b. The reference does every step in float64 and rounds with torch's e4m3 cast.
"""

import pytest
import torch
from safetensors.torch import save_file

from kontext_rt import Optimizations, Pipeline
from kontext_rt.model import fp8_linear as f8
from kontext_rt.weights.formats import detect

E4M3_MAX = 448.0
U32, U_BF16 = 2.0**-24, 2.0**-8  # unit roundoff of float32 and bfloat16 (round to nearest)
GRID = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
GRID = GRID[torch.isfinite(GRID)].unique()  # sorted, every finite e4m3 value
MIDPOINTS = (GRID[1:] + GRID[:-1]) / 2


def e4m3(v: torch.Tensor) -> torch.Tensor:
    """float64 values -> the nearest e4m3 values (clamped to the format's range), as float64."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).double()


def quantize(v: torch.Tensor):
    """float64 values (already divided by their scale) -> (nearest e4m3, the other neighbour where v is a tie).

    The runtime forms v in float32 (the scale rounded once, the quotient once: within 2 u32 relative of v), so a v
    that close to a midpoint between two e4m3 values may round to either. bf16 data makes exact ties common (8-bit
    significands over a scale of 448 / amax), so they are allowed for, not avoided."""
    v = v.clamp(-E4M3_MAX, E4M3_MAX)
    q = e4m3(v)
    dist = (v[..., None] - MIDPOINTS).abs()
    gap, nearest = dist.min(-1)
    tie = gap <= 4 * U32 * v.abs()
    return q, torch.where(tie, 2 * MIDPOINTS[nearest] - q, q)


def reference(x, weight, bias, amax):
    """float64 static FP8 linear: x (R, K), weight (N, K), bias (N,), amax a float.

    -> y (R, N) with every operand rounded to the nearest e4m3, |terms| (R, N) the sum of the products' and bias'
    magnitudes, and slack (R, N) the most a tie rounded the other way can move y."""
    x, weight, bias = x.double(), weight.double(), bias.double()
    s_w = weight.abs().amax(-1, keepdim=True) / E4M3_MAX  # (N, 1)
    s_x = torch.tensor(float(amax), dtype=torch.float64) / E4M3_MAX
    (xq, x_alt), (wq, w_alt) = quantize(x / s_x), quantize(weight / s_w)
    xq, x_alt, wq, w_alt = xq * s_x, x_alt * s_x, wq * s_w, w_alt * s_w
    dx, dw = (x_alt - xq).abs(), (w_alt - wq).abs()
    slack = dx @ (wq.abs() + dw).T + xq.abs() @ dw.T
    return xq @ wq.T + bias, xq.abs() @ wq.abs().T + bias.abs(), slack


def bound(y_ref, terms, slack, k):
    """What the runtime may differ by: ties rounded the other way (slack); both scales rounded to float32 and each
    dequantized operand's product (4 u32 per term); the float32 sum of k products and the bias ((k + 1) u32 of the
    sum of |terms|); then the bfloat16 output (one rounding, u_bf16 relative to the float32 value, itself within
    the rest of the bound of y_ref). Measured: the bfloat16 rounding dominates, errors reach ~0.9 of the bound."""
    before_output = slack + (k + 6) * U32 * (terms + slack)
    return before_output + U_BF16 * (y_ref.abs() + before_output)


def fp8_case(gen, k=96, n=48, rows=14):
    """bf16 weights over three decades of row magnitude, a bias, and activations with a calibrated amax below
    their largest value (static scales clip)."""
    lin = torch.nn.Linear(k, n).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * torch.logspace(-2, 1, n)[:, None])
        lin.bias.copy_(torch.randn(n, generator=gen))
    x = (torch.randn(rows, k, generator=gen) * 3).to(torch.bfloat16)
    return lin, x, torch.tensor(0.8 * x.float().abs().max().item())


@pytest.mark.parametrize("matmul", ["this device's", "stand-in"])
def test_static_fp8_linear_matches_float64_recipe(matmul):
    fn = f8.matmul_for("cpu") if matmul == "this device's" else f8.scaled_mm_dequantized
    lin, x, amax = fp8_case(torch.Generator().manual_seed(0))
    layer = f8.FP8Linear.from_linear(lin, input_amax=amax, matmul=fn)
    y = layer(x)
    y_ref, terms, slack = reference(x, lin.weight, lin.bias, amax)
    assert (x.double().abs() > amax.item()).any(), "the case must clip some activations"
    assert y.dtype == torch.bfloat16 and y.shape == y_ref.shape
    err = (y.double() - y_ref).abs()
    assert (err <= bound(y_ref, terms, slack, x.shape[1])).all(), f"max error {err.max():.3g}"


def write_calibration(path, names, amax, checkpoint):
    """A calibration file as the export stage writes it: `<layer>.input_quantizer._amax` per layer (and weight
    quantizers, which the runtime does not use), the format tag and the checkpoint fingerprint in the header."""
    tensors = {}
    for name in names:
        tensors[f"{name}.input_quantizer._amax"] = torch.tensor(amax[name])
        tensors[f"{name}.weight_quantizer._amax"] = torch.tensor(1.0)
    save_file(tensors, str(path), metadata={"format": f8.CALIBRATION_FORMAT, "checkpoint": checkpoint})
    return path


def test_static_pipeline_uses_the_calibration_files_scales(kontext_dir, tmp_path):
    plain = Pipeline.from_pretrained(kontext_dir, dtype=torch.bfloat16, max_sequence_length=8)
    names = [n for n, m in plain.transformer.named_modules() if isinstance(m, torch.nn.Linear) and f8.fp8_eligible(n)]
    gen = torch.Generator().manual_seed(1)
    amax = {n: 1.0 + 4.0 * torch.rand((), generator=gen).item() for n in names}  # a different scale per layer
    halved = {n: v / 2 for n, v in amax.items()}
    ckpt = detect(kontext_dir).fingerprint()
    pipes = [
        Pipeline.from_pretrained(
            kontext_dir,
            dtype=torch.bfloat16,
            max_sequence_length=8,
            optimize=Optimizations(
                fp8="static", fp8_calibration=write_calibration(tmp_path / f"{i}.safetensors", names, a, ckpt)
            ),
        )
        for i, a in enumerate((amax, halved))
    ]
    for pipe, a in zip(pipes, (amax, halved), strict=True):
        layers = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, f8.FP8Linear)}
        assert sorted(layers) == sorted(names)
        for n, layer in layers.items():  # the file's float32 amax / 448, rounded once to float32
            want = (torch.tensor(a[n]).double() / E4M3_MAX).float()
            assert layer.input_scale is not None and torch.equal(layer.input_scale, want), n
    args = dict(prompt="x", width=32, height=32, steps=2, seed=0, output="latent")
    first, second = (p.generate(**args) for p in pipes)
    assert torch.isfinite(first).all() and not torch.equal(first, second)

    # one of the pipeline's layers against the recipe, on activations its amax clips
    name = names[0]
    original = plain.transformer.get_submodule(name)
    x = (torch.randn(6, original.in_features, generator=gen) * amax[name]).to(torch.bfloat16)
    with torch.no_grad():
        y = pipes[0].transformer.get_submodule(name)(x)
    y_ref, terms, slack = reference(x, original.weight, original.bias, torch.tensor(amax[name]).item())
    assert ((y.double() - y_ref).abs() <= bound(y_ref, terms, slack, x.shape[1])).all()


def test_a_backend_keeps_nothing_between_check_and_load(kontext_dir, tmp_path):
    """What a check reads for the load (the static calibration) travels in what it returns, not on the backend: one
    backend checking two requests hands each its own scales."""
    from kontext_rt import backends

    found = detect(kontext_dir)
    cfg = found.transformer_config()
    names = ["single_blocks.0.linear1", "single_blocks.0.linear2"]
    requests = [
        backends.LoadRequest(
            found,
            kontext_dir,
            cfg,
            torch.bfloat16,
            Optimizations(
                fp8="static",
                fp8_calibration=write_calibration(tmp_path / f"{i}.safetensors", names, a, found.fingerprint()),
            ),
        )
        for i, a in enumerate(({n: 1.0 for n in names}, {n: 2.0 for n in names}))
    ]
    eager = backends.Eager(torch.device("cpu"))
    before = dict(vars(eager))
    first, second = (eager.check(r) for r in requests)
    assert vars(eager) == before
    assert first.backend is eager and first.request is requests[0] and second.request is requests[1]
    assert [first.input_amax[n].item() for n in names] == [1.0, 1.0]
    assert [second.input_amax[n].item() for n in names] == [2.0, 2.0]
