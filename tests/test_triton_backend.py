"""The `triton` backend: the kernels as registered torch ops, the backend's capability checks, and the whole
tiny model with backend="triton" against backend="eager" on the same weights (CPU, TRITON_INTERPRET)."""

import copy
from pathlib import Path

import pytest
import torch

from kontext_rt import Pipeline
from kontext_rt.backends import resolve
from kontext_rt.errors import BackendUnavailable
from kontext_rt.kernels import ops as kernel_ops
from kontext_rt.model.op_table import EAGER_OPS
from kontext_rt.model.rope import rope_table, sequence_ids
from kontext_rt.weights.formats import detect
from tests.kernel_inputs import LAYOUTS, assert_close, norm_scales, qkv, rope_tables


def _attention_args(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    text, grids = LAYOUTS["one-context"]
    cos, sin = rope_tables(text, grids, 32)
    q, k, v = qkv(1, 2, cos.shape[0], 32, dtype, gen)
    return q, k, v, norm_scales(32, dtype, gen), norm_scales(32, dtype, gen), text, cos, sin


def _flat(q, k, v, qs, ks, split, cos, sin):
    return (q, k, v, *qs, *ks, split, cos, sin)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and dispatch of every kontext_rt op, as torch.library checks them."""
    q, k, v, qs, ks, split, cos, sin = _attention_args()
    x = torch.randn(2, 5, 32)
    shift, scale, gate = torch.randn(2, 1, 96).chunk(3, -1)
    cases = [
        (torch.ops.kontext_rt.rope_attention.default, (*_flat(q, k, v, qs, ks, split, cos, sin), True, True)),
        (torch.ops.kontext_rt.qk_norm_rope.default, (q, k, *qs, *ks, split, cos, sin)),
        (torch.ops.kontext_rt.modulate.default, (x, shift, scale)),
        (torch.ops.kontext_rt.gated_residual.default, (x, gate, torch.randn(2, 5, 32))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_export_sees_one_op_per_kernel():
    """torch.export traces the attention op as a single node (no SDPA, no RoPE arithmetic around it)."""

    class Block(torch.nn.Module):
        def forward(self, q, k, v, qs0, qs1, ks0, ks1, cos, sin):
            return kernel_ops.attention(q, k, v, (qs0, qs1), (ks0, ks1), 7, cos, sin)

    q, k, v, qs, ks, split, cos, sin = _attention_args()
    q, k, v = (t.contiguous() for t in (q, k, v))
    graph = torch.export.export(Block(), (q, k, v, *qs, *ks, cos, sin)).graph
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.kontext_rt.rope_attention.default]


@pytest.mark.parametrize("variant", ["attention_prerotated", "attention_sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_kernel_variants_match_reference(dtype, variant):
    """The norm+RoPE pass, then plain attention (the Triton flash kernel, or torch SDPA as the triton backend
    runs it), under the same rule as the fused kernel."""
    from kontext_rt.kernels import reference

    q, k, v, qs, ks, split, cos, sin = _attention_args(dtype)
    got = getattr(kernel_ops, variant)(q, k, v, qs, ks, split, cos, sin)
    as64 = [[t.double() for t in group] for group in ((q, k, v), qs, ks)]
    truth = reference.rope_attention(*as64[0], as64[1], as64[2], split, cos, sin)
    assert_close(got, truth, reference.rope_attention(q, k, v, qs, ks, split, cos, sin), dtype, variant)


def test_backend_resolves_on_the_interpreter():
    backend = resolve("triton", "cpu")
    ops = backend.ops
    assert backend.name == "triton" and ops.attention is kernel_ops.attention_sdpa and ops.head_dims == (32, 64, 128)
    assert resolve("auto", "cpu").name == "eager"  # on a CPU auto stays on the reference path, interpreter or not


def test_auto_takes_triton_on_cuda_and_falls_back_to_eager(monkeypatch):
    from kontext_rt import backends

    # this machine: triton cannot run on "cuda" (interpreted kernels, or no GPU), so auto falls back to eager
    assert resolve("auto", "cuda").name == "eager"

    class Runs(backends.Triton):  # a triton backend that can run on "cuda" here
        def __init__(self, device):
            backends.Backend.__init__(self, device)

    monkeypatch.setitem(backends.REGISTRY, "triton", Runs)  # the registry maps names to classes
    assert resolve("auto", "cuda").name == "triton"
    assert resolve("auto", "cpu").name == "eager"


def test_from_pretrained_defaults_to_auto(kontext_dir, monkeypatch):
    """auto is the default: on this CPU it is eager, and where auto's order puts triton first, the default does too."""
    from types import MappingProxyType

    from kontext_rt.backends import registry

    assert Pipeline.from_pretrained(kontext_dir).backend == "eager"
    monkeypatch.setattr(registry, "AUTO_ORDER", MappingProxyType({"cpu": ("triton", "eager")}))
    assert Pipeline.from_pretrained(kontext_dir).backend == "triton"


def test_auto_falls_back_to_eager_on_a_head_dim_the_kernels_lack_and_says_why(kontext_dir, monkeypatch):
    from types import MappingProxyType

    from kontext_rt import backends
    from kontext_rt.backends import registry

    monkeypatch.setattr(kernel_ops, "HEAD_DIMS", (64, 128))
    monkeypatch.setattr(registry, "AUTO_ORDER", MappingProxyType({"cpu": ("triton", "eager")}))
    assert resolve("auto", "cpu").name == "triton"
    assert Pipeline.from_pretrained(kontext_dir, backend="auto").backend == "eager"
    with pytest.raises(BackendUnavailable, match="head dims"):  # asked for by name: refused, never swapped
        Pipeline.from_pretrained(kontext_dir, backend="triton")

    seen = []
    real = backends.checked

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(backends, "checked", spy)
    Pipeline.from_pretrained(kontext_dir, backend="auto")
    chosen = seen[-1].backend
    assert chosen.name == "eager" and "supports head dims (64, 128), this model has 32" in chosen.passed_over[0]


def test_triton_that_cannot_build_a_kernel_is_refused_with_the_reason(monkeypatch):
    from kontext_rt.backends.torch_backends import launches

    launches(kernel_ops, torch.device("cpu"))  # the interpreter runs it

    def no_compiler(*args):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(kernel_ops, "gated_residual", no_compiler)
    with pytest.raises(BackendUnavailable, match="could not compile and run a kernel here.*C compiler"):
        launches(kernel_ops, torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is visible")
def test_backend_on_cuda_without_a_gpu_says_why():
    with pytest.raises(BackendUnavailable, match="backend 'triton'.*use backend='eager'"):
        resolve("triton", "cuda")


@pytest.mark.parametrize("fmt", ["diffusers", "bfl"])
def test_a_head_dim_the_kernels_lack_is_refused_before_loading(kontext_dir, bfl_files, fmt, monkeypatch):
    """Refused from the config alone: no weights are read (load_transformer is never reached)."""
    from kontext_rt.weights.formats import CheckpointFormat

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the backend check")

    monkeypatch.setattr(kernel_ops, "HEAD_DIMS", (64, 128))
    monkeypatch.setattr(CheckpointFormat, "load_transformer", must_not_load)
    path, encoders = (kontext_dir, None) if fmt == "diffusers" else (bfl_files["flux"], bfl_files["text_encoders"])
    with pytest.raises(BackendUnavailable, match=r"supports head dims \(64, 128\), this model has 32"):
        Pipeline.from_pretrained(path, backend="triton", text_encoders=encoders, variant="flux-kontext-dev")


@pytest.fixture(scope="module")
def tiny(kontext_dir):
    return detect(kontext_dir).load_transformer(torch.float32, "cpu")


def _model_inputs(cfg, text, grids, dtype):
    gen = torch.Generator().manual_seed(text)
    n, m = grids[0][0] * grids[0][1], sum(r * c for r, c in grids[1:])
    img = torch.randn(2, n, cfg.in_channels, generator=gen).to(dtype)
    ctx = torch.randn(2, m, cfg.in_channels, generator=gen).to(dtype) if m else None
    txt = torch.randn(2, text, cfg.context_in_dim, generator=gen).to(dtype)
    pooled = torch.randn(2, cfg.vec_in_dim, generator=gen).to(dtype)
    cos, sin = rope_table(sequence_ids(text, grids), cfg.axes_dim, cfg.theta)
    return img, ctx, txt, pooled, torch.tensor([0.3, 0.9]), torch.tensor([2.5, 4.0]), cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["one-context", "two-contexts", "text-to-image"])
@torch.no_grad()
def test_whole_model_triton_matches_eager(tiny, dtype, layout):
    """Same weights, same inputs: the triton op table against the eager one, with the float64 eager model as the
    truth; the triton model may be off by at most twice the eager model's own error in that dtype (+1 ulp)."""
    ops = resolve("triton", "cpu").ops
    text, grids = LAYOUTS[layout]
    inputs = _model_inputs(tiny.cfg, text, grids, dtype)
    img, ctx, txt, pooled, t, g, cos, sin = inputs
    as64 = [None if x is None else x.double() for x in (img, ctx, txt, pooled)]
    truth = copy.deepcopy(tiny).double()(*as64, t, g, cos, sin)  # the RoPE tables stay float32 everywhere
    model = copy.deepcopy(tiny).to(dtype)
    eager = model(*inputs, ops=EAGER_OPS)
    fast = model(*inputs, ops=ops)
    assert_close(fast, truth, eager, dtype, f"whole model {dtype} {layout}")


def test_pipeline_with_the_triton_backend(kontext_dir):
    """End to end: an edit with backend='triton' gives the eager pipeline's latents (the issue-2 edit bound)."""
    from PIL import Image

    image = Image.new("RGB", (48, 32), (200, 40, 90))
    latents = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
    outs = []
    for backend in ("eager", "triton"):
        pipe = Pipeline.from_pretrained(kontext_dir, backend=backend, max_sequence_length=16)
        outs.append(pipe.edit(image, "a red car", steps=3, latents=latents, output="latent", auto_resize=False))
    rel = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("placement", ["lean", "offload"])
def test_triton_with_a_placement_gives_the_resident_result(kontext_dir, placement):
    """The triton op table over streamed and staged weights (what `auto` runs on a GPU with --placement): an edit
    and a generation bit for bit the resident triton pipeline's."""
    from PIL import Image

    image = Image.fromarray((torch.arange(32 * 32 * 3) % 251).to(torch.uint8).reshape(32, 32, 3).numpy())

    def run(pipe):
        edit = pipe.edit(image, "red", steps=2, seed=3, auto_resize=False, output="latent")
        return edit, pipe.generate("a fox", width=32, height=32, steps=2, seed=3, output="latent")

    kw = dict(backend="triton", max_sequence_length=8)  # the interpreter pays per token row: few text tokens
    resident = run(Pipeline.from_pretrained(kontext_dir, **kw))
    got = run(Pipeline.from_pretrained(kontext_dir, placement=placement, **kw))
    for a, b in zip(got, resident, strict=True):
        assert torch.equal(a, b)


def test_auto_on_a_gpu_warns_why_it_runs_a_slower_backend():
    """On CUDA a backend passed over costs speed: auto says so, with the reasons; asked for by name, nothing to say."""
    import warnings

    from kontext_rt import Optimizations, backends
    from kontext_rt.config import PRESETS

    request = backends.LoadRequest(None, Path("x"), PRESETS["tiny"], torch.float32, Optimizations())
    chosen = backends.Eager(torch.device("cuda"))  # no CUDA call is made: a stand-in for what resolve returned
    chosen.passed_over = ("backend 'triton' could not compile and run a kernel here (no C compiler)",)
    with pytest.warns(RuntimeWarning, match="runs 'eager' on this GPU.*no C compiler"):
        assert backends.checked(chosen, request, auto=True).backend is chosen
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.checked(chosen, request, auto=False)
        backends.checked(backends.Eager(torch.device("cpu")), request, auto=True)
