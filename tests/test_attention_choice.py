"""The triton backend's attention choice (Optimizations.attention): sdpa unchanged, FA3 (bf16 and FP8) after the
pre-pass, its probe and refusals. No GPU here: FA3 is a fake module, injected where the import looks (sys.modules),
and the probe's device check is bypassed by calling its forward check with the CPU and the module as arguments."""

import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kontext_rt import Optimizations, Pipeline
from kontext_rt.backends import attention as attn
from kontext_rt.backends import resolve
from kontext_rt.errors import InputError
from kontext_rt.kernels import reference
from kontext_rt.options import Attention
from tests.kernel_inputs import LAYOUTS, assert_close, norm_scales, qkv, rope_tables

CPU = torch.device("cpu")


# ---- fake FA3 modules ---------------------------------------------------------------------------------------------


def _dequantized(q, k, v, descales):
    return [
        t.float() if d is None else t.float() * d[:, None, :, None] for t, d in zip((q, k, v), descales, strict=True)
    ]


def correct_forward(q, k, v, softmax_scale=None, causal=False, q_descale=None, k_descale=None, v_descale=None):
    """FA3's contract in plain torch: (B, L, H, D), FP8 inputs times their (B, H) descales, bf16 out for FP8."""
    assert softmax_scale is None and not causal
    out = F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in _dequantized(q, k, v, (q_descale, k_descale, v_descale)))
    )
    return out.transpose(1, 2).to(torch.bfloat16 if q_descale is not None else q.dtype)


def wrong_layout(q, k, v, q_descale=None, k_descale=None, v_descale=None, **kw):
    """Reads (B, L, H, D) as if it were (B, H, L, D): attends over heads instead of tokens."""
    out = F.scaled_dot_product_attention(*_dequantized(q, k, v, (q_descale, k_descale, v_descale)))
    return out.to(torch.bfloat16 if q_descale is not None else q.dtype)


def ignores_descales(q, k, v, **kw):
    """Takes the stored e4m3 values for the tensor's: every descale left out."""
    return correct_forward(*(t.float().to(torch.bfloat16) for t in (q, k, v)))


def with_lse(*args, **kwargs):
    """Older FA3 interfaces return (out, softmax_lse)."""
    return correct_forward(*args, **kwargs), None


def module(forward) -> types.ModuleType:
    fake = types.ModuleType("flash_attn_interface")
    fake.flash_attn_func = forward
    return fake


@pytest.fixture
def fa3(monkeypatch):
    """Installs a fake FA3 module where import_fa3 finds it; returns the installer."""

    def install(forward=correct_forward):
        fake = module(forward)
        monkeypatch.setitem(sys.modules, "flash_attn_interface", fake)
        return fake

    return install


def _attention_inputs(dtype, head_dim=128):
    gen = torch.Generator().manual_seed(0)
    text, grids = LAYOUTS["two-contexts"]
    cos, sin = rope_tables(text, grids, head_dim)
    q, k, v = qkv(1, 2, cos.shape[0], head_dim, dtype, gen)
    return q, k, v, norm_scales(head_dim, dtype, gen), norm_scales(head_dim, dtype, gen), text, cos, sin


def _fa3_ops(kind, fake):
    """The triton backend's op table with the attention the check would choose for `kind` on a GPU."""
    choice = attn.AttentionChoice(kind, fake, attn.prepass_for(CPU))
    ops = resolve("triton", "cpu").ops
    return replace(ops, attention=choice.op(ops.attention))


# ---- options and refusals -----------------------------------------------------------------------------------------


def test_attention_option_takes_its_strings_and_refuses_others():
    assert Optimizations().attention is Attention.AUTO
    assert Optimizations(attention="fa3-fp8").attention is Attention.FA3_FP8
    with pytest.raises(InputError, match="attention must be one of auto, sdpa, fa3, fa3-fp8, got 'flash'"):
        Optimizations(attention="flash").check(CPU, torch.bfloat16)
    with pytest.raises(InputError, match="attention='fa3' runs FA3 in bf16 or fp16"):
        Optimizations(attention="fa3").check(CPU, torch.float32)
    with pytest.raises(InputError, match="attention='fa3-fp8' gives bfloat16 outputs"):
        Optimizations(attention="fa3-fp8").check(CPU, torch.float16)
    Optimizations(attention="fa3").check(CPU, torch.float16)


@pytest.fixture
def no_weights(monkeypatch):
    from kontext_rt.weights.formats import CheckpointFormat

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the attention was refused")

    monkeypatch.setattr(CheckpointFormat, "load_transformer", must_not_load)


@pytest.mark.parametrize("kind", ["fa3", "fa3-fp8"])
def test_eager_refuses_fa3_before_loading(kontext_dir, no_weights, kind):
    with pytest.raises(InputError, match=f"attention='{kind}' runs FlashAttention-3, which only backend='triton'"):
        Pipeline.from_pretrained(
            kontext_dir, backend="eager", dtype=torch.bfloat16, optimize=Optimizations(attention=kind)
        )


def test_tensorrt_refuses_fa3():
    from kontext_rt import backends
    from kontext_rt.config import PRESETS

    opts = Optimizations(attention="fa3")
    req = backends.LoadRequest(None, Path("x"), PRESETS["tiny"], torch.bfloat16, opts, engines=Path("engines"))
    stand_in = object.__new__(backends.TensorRT)  # its __init__ needs a GPU; check reads only the request
    with pytest.raises(InputError, match="only backend='triton' loads; backend 'tensorrt' runs its own attention"):
        stand_in.check(req)


@pytest.mark.parametrize("kind", ["fa3", "fa3-fp8"])
def test_triton_refuses_fa3_with_the_probes_reason_before_loading(kontext_dir, no_weights, fa3, kind):
    """The tiny model's head dim is 32: refused from the config, with what FA3 needs, before any weights."""
    fa3()
    with pytest.raises(InputError, match=rf"attention='{kind}' cannot run here: FA3 is built for head dim 128, "
                       r"this model has 32; use attention='sdpa'"):  # fmt: skip
        Pipeline.from_pretrained(
            kontext_dir, backend="triton", dtype=torch.bfloat16, optimize=Optimizations(attention=kind)
        )


def test_the_capability_checks_name_what_fa3_needs(monkeypatch):
    with pytest.raises(attn.Fa3Unavailable, match="head dim 128, this model has 64"):
        attn.model_fits(64, torch.bfloat16)
    with pytest.raises(attn.Fa3Unavailable, match="bf16 or fp16 models"):
        attn.model_fits(128, torch.float32)
    attn.model_fits(128, torch.float16)
    with pytest.raises(attn.Fa3Unavailable, match=r"compute capability 9.0 \(sm_90a, Hopper\), not cpu"):
        attn.device_capable(CPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(attn.Fa3Unavailable, match=r"compute capability 9.0 .*NVIDIA A100 has \(8, 0\)"):
        attn.device_capable(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    attn.device_capable(torch.device("cuda"))


# ---- the probe: import and one forward ----------------------------------------------------------------------------


def test_a_module_that_fails_to_import_is_a_reason(monkeypatch):
    for name in attn.FA3_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(attn.Fa3Unavailable, match="no FA3 module imports here.*flash_attn_interface: ModuleNotFound"):
        attn.import_fa3()

    def broken_library(name):  # what a wheel built against another CUDA says
        raise ImportError("libcudart.so.13: cannot open shared object file: No such file or directory")

    with pytest.raises(attn.Fa3Unavailable, match="flash_attn_interface: ImportError: libcudart.so.13"):
        attn.import_fa3(broken_library)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.ModuleType("flash_attn_interface"))
    with pytest.raises(attn.Fa3Unavailable, match="flash_attn_interface has no flash_attn_func"):
        attn.import_fa3()


def test_import_finds_the_module(fa3):
    fake = fa3()
    assert attn.import_fa3() is fake


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("forward", [correct_forward, with_lse], ids=["out", "out-lse"])
def test_probe_passes_a_correct_forward(forward, fp8):
    attn.forward_agrees(module(forward), CPU, fp8)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_probe_catches_a_wrong_layout(fp8):
    with pytest.raises(attn.Fa3Unavailable, match="disagrees with SDPA on cpu: max error"):
        attn.forward_agrees(module(wrong_layout), CPU, fp8)


def test_probe_catches_descales_left_out():
    with pytest.raises(attn.Fa3Unavailable, match="FP8 forward disagrees with SDPA"):
        attn.forward_agrees(module(ignores_descales), CPU, fp8=True)


def test_probe_catches_a_forward_that_fails_or_returns_the_wrong_shape():
    def no_kernel(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    with pytest.raises(attn.Fa3Unavailable, match="forward failed on cpu.*no kernel image"):
        attn.forward_agrees(module(no_kernel), CPU, fp8=False)
    flat = lambda *a, **kw: correct_forward(*a, **kw).flatten(2)
    with pytest.raises(attn.Fa3Unavailable, match=r"returned \(\(1, 48, 256\)"):
        attn.forward_agrees(module(flat), CPU, fp8=False)


def test_probe_bound_comes_from_the_roundings():
    """bf16: two roundings of 2^-8 (P and the output), doubled; e4m3: 2^-4 for P plus half its subnormal step per
    weight, and the bf16 output's 2^-8, doubled."""
    v = torch.full((1, 48, 2, 128), 2.0)
    assert attn.probe_bound(v, False, torch.bfloat16) == 2 * 2 * 2**-8 * 2.0
    assert attn.probe_bound(v, True, torch.bfloat16) == 2 * (2**-4 + 48 * 2**-10 + 2**-8) * 2.0


# ---- end to end through the op table ------------------------------------------------------------------------------


@pytest.mark.parametrize("forward", [correct_forward, with_lse], ids=["out", "out-lse"])
def test_fa3_through_the_op_table_matches_rope_attention(fa3, forward):
    """bf16 FA3 after the pre-pass, as the triton backend's op table runs it: against float64 rope_attention,
    within the kernels' rule (twice torch's own bf16 error, + 1 ulp)."""
    fake = fa3(forward)
    attn.forward_agrees(attn.import_fa3(), CPU, fp8=False)  # the probe, on the CPU: its device check bypassed
    q, k, v, qs, ks, split, cos, sin = _attention_inputs(torch.bfloat16)
    got = _fa3_ops(Attention.FA3, fake).attention(q, k, v, qs, ks, split, cos, sin)
    as64 = [[t.double() for t in group] for group in ((q, k, v), qs, ks)]
    truth = reference.rope_attention(*as64[0], as64[1], as64[2], split, cos, sin)
    assert got.shape == truth.shape and got.dtype == torch.bfloat16
    assert_close(got, truth, reference.rope_attention(q, k, v, qs, ks, split, cos, sin), torch.bfloat16, "fa3")


@pytest.mark.parametrize("smooth_k", [False, True], ids=["plain", "smooth-k"])
def test_fa3_fp8_through_the_op_table_matches_attention_of_its_quantized_inputs(fa3, smooth_k):
    """fa3-fp8 as the op table runs it, against float64 attention of the pre-pass's dequantized e4m3 q, k, v:
    the wiring (layout, descales, the (B, L, H*D) output) may cost only the bf16 output's rounding (2^-8 of the
    largest output) and float32's (doubled). The quantization's own error is test_emulated_fp8_attention's."""
    fake = fa3()
    attn.forward_agrees(attn.import_fa3(), CPU, fp8=True)
    q, k, v, qs, ks, split, cos, sin = _attention_inputs(torch.bfloat16)
    choice = attn.AttentionChoice(Attention.FA3_FP8, fake, attn.prepass_for(CPU), smooth_k=smooth_k)
    got = choice.op(None)(q, k, v, qs, ks, split, cos, sin)
    pre = reference.attention_prepass(q, k, v, qs, ks, split, cos, sin, fp8=True, smooth_k=smooth_k)
    exact = [t.double() * d.double()[:, None, :, None] for t, d in zip(pre[:3], pre[3:], strict=True)]
    truth = reference.attention(*(t.transpose(1, 2) for t in exact))
    err, bound = (got.double() - truth).abs().max().item(), 2 * 2**-8 * truth.abs().max().item()
    assert got.shape == truth.shape and got.dtype == torch.bfloat16
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def test_the_end_to_end_bound_catches_a_wrong_layout(fa3):
    """The comparison above can fail: FA3 given (B, H, L, D) where it reads (B, L, H, D) is far outside it."""
    q, k, v, qs, ks, split, cos, sin = _attention_inputs(torch.bfloat16)
    got = _fa3_ops(Attention.FA3, fa3(wrong_layout)).attention(q, k, v, qs, ks, split, cos, sin)
    as64 = [[t.double() for t in group] for group in ((q, k, v), qs, ks)]
    truth = reference.rope_attention(*as64[0], as64[1], as64[2], split, cos, sin)
    with pytest.raises(AssertionError, match="max error"):
        assert_close(got, truth, reference.rope_attention(q, k, v, qs, ks, split, cos, sin), torch.bfloat16)


# ---- what the backend chooses -------------------------------------------------------------------------------------


def test_explicit_fa3_on_the_cpu_is_an_input_error_naming_why(fa3):
    fa3()
    with pytest.raises(InputError, match=r"attention='fa3-fp8' cannot run here: FA3 needs a CUDA GPU of compute "
                       r"capability 9.0 \(sm_90a, Hopper\), not cpu; use attention='sdpa'"):  # fmt: skip
        attn.choose("fa3-fp8", CPU, 128, torch.bfloat16)


def test_auto_is_sdpa_today_and_sdpa_is_sdpa():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for device in (CPU, torch.device("cuda")):
            assert attn.choose("auto", device, 128, torch.bfloat16) == attn.AttentionChoice(Attention.SDPA)
            assert attn.choose("sdpa", device, 128, torch.bfloat16) == attn.AttentionChoice(Attention.SDPA)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given when no GPU is visible")
def test_auto_that_prefers_fa3_falls_back_with_a_warning_giving_the_reason(monkeypatch, fa3):
    monkeypatch.setattr(attn, "AUTO_PREFERS", (Attention.FA3,))
    with pytest.warns(RuntimeWarning, match="attention 'auto' runs sdpa: fa3: FA3 needs a CUDA GPU .* none is visible"):
        choice = attn.choose("auto", torch.device("cuda"), 128, torch.bfloat16)
    assert choice.kind is Attention.SDPA and "none is visible" in choice.passed_over[0]
    assert attn.choose("auto", CPU, 128, torch.bfloat16).kind is Attention.SDPA  # off CUDA: nothing to prefer
    # where the probe passes, auto takes what it prefers (the probe stood in for: no GPU here)
    fake = fa3()
    monkeypatch.setattr(attn, "probe", lambda kind, device, head_dim, dtype, import_module: (fake, None))
    assert attn.choose("auto", torch.device("cuda"), 128, torch.bfloat16).kind is Attention.FA3


@pytest.mark.parametrize("attention", ["auto", "sdpa"])
def test_triton_loads_sdpa_as_before(kontext_dir, attention):
    """The triton backend's check chooses sdpa, and its op table is the kernels' own: the same ops as before."""
    from kontext_rt.kernels import ops as kernel_ops
    from kontext_rt.load_spec import LoadSpec

    checked = LoadSpec(kontext_dir, backend="triton", optimize=Optimizations(attention=attention)).check()
    accepted = checked.accepted
    assert accepted.attention == attn.AttentionChoice(Attention.SDPA)
    assert accepted.backend.op_table(accepted).attention is kernel_ops.attention_sdpa


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_sdpa_gives_todays_pixels_bit_for_bit(kontext_dir, backend):
    """attention='sdpa' is the path every load ran before the option existed: the same latents, bit for bit."""
    from PIL import Image

    image = Image.new("RGB", (48, 32), (200, 40, 90))
    latents = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
    outs = []
    for optimize in (None, Optimizations(attention="sdpa")):
        pipe = Pipeline.from_pretrained(kontext_dir, backend=backend, max_sequence_length=8, optimize=optimize)
        outs.append(pipe.edit(image, "a red car", steps=2, latents=latents, output="latent", auto_resize=False))
    assert torch.equal(outs[0], outs[1])


# ---- a whole pipeline with FA3 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_dim_128(tmp_path_factory):
    """A tiny Kontext with FLUX's head dim (2 heads of 128) as a diffusers folder: a model FA3 takes."""
    from kontext_rt.config import PRESETS, VAE_PRESETS
    from kontext_rt.model.transformer import FluxTransformer
    from kontext_rt.model.vae import AutoEncoder
    from kontext_toy.checkpoints import write_diffusers_checkpoint

    cfg = replace(PRESETS["tiny"], hidden_size=256, num_heads=2, axes_dim=(16, 56, 56))
    gen = torch.Generator().manual_seed(5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model, vae = FluxTransformer(cfg), AutoEncoder(VAE_PRESETS["tiny"])
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norm scales start at exactly 1
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    folder = tmp_path_factory.mktemp("head-dim-128")
    write_diffusers_checkpoint(folder, model, vae, seed=5)
    return folder


@pytest.fixture
def as_if_hopper(monkeypatch):
    """Test-only: the probe's device check passes on this CPU; its model, import and forward checks still run."""
    monkeypatch.setattr(attn, "device_capable", lambda device: None)


@pytest.mark.parametrize("kind", ["fa3", "fa3-fp8"])
def test_a_pipeline_loads_fa3_and_runs_it_every_step(head_dim_128, fa3, as_if_hopper, kind):
    """From_pretrained to the last step: the check probes the (fake) module, the load puts FA3 after the pre-pass
    in the triton op table, and every block of every step calls it: the latents are those of the triton op table
    with that attention composed by hand, bit for bit."""
    from PIL import Image

    from kontext_rt.sampling.denoisers import for_model

    fp8 = kind == "fa3-fp8"
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["q_descale"] is not None)
        return correct_forward(*args, **kwargs)

    fa3(counted)

    def by_hand(q, k, v, q_scales, k_scales, split, cos, sin):
        pre = reference.attention_prepass(q, k, v, q_scales, k_scales, split, cos, sin, fp8=fp8)
        return correct_forward(*pre[:3], q_descale=pre[3], k_descale=pre[4], v_descale=pre[5]).flatten(2)

    image = Image.fromarray((torch.arange(32 * 32 * 3) % 251).to(torch.uint8).reshape(32, 32, 3).numpy())
    kw = dict(backend="triton", dtype=torch.bfloat16, max_sequence_length=8)
    pipe = Pipeline.from_pretrained(head_dim_128, optimize=Optimizations(attention=kind), **kw)
    probed = len(calls)
    got = pipe.edit(image, "red", steps=2, seed=3, auto_resize=False, output="latent")
    blocks = pipe.cfg.depth + pipe.cfg.depth_single_blocks
    assert probed == 1 and len(calls) == 1 + 2 * blocks and set(calls) == {fp8}
    ref = Pipeline.from_pretrained(head_dim_128, optimize=Optimizations(attention="sdpa"), **kw)
    ref.denoiser = for_model(ref.transformer, replace(ref.denoiser.ops, attention=by_hand), torch.bfloat16)
    want = ref.edit(image, "red", steps=2, seed=3, auto_resize=False, output="latent")
    assert torch.equal(got, want)


def test_a_bf16_fa3_pipeline_is_as_close_to_fp32_as_eager_bf16(head_dim_128, fa3, as_if_hopper):
    """An edit with attention='fa3' (the correct fake) against the fp32 eager edit, under the kernels' rule: at
    most twice the eager bf16 edit's own error, plus one bf16 ulp of the latents' scale."""
    from PIL import Image

    fa3()
    image = Image.fromarray((torch.arange(32 * 32 * 3) % 251).to(torch.uint8).reshape(32, 32, 3).numpy())

    def edit(**kw):
        pipe = Pipeline.from_pretrained(head_dim_128, max_sequence_length=8, **kw)
        return pipe.edit(image, "red", steps=2, seed=3, auto_resize=False, output="latent")

    truth = edit().double()
    eager = edit(dtype=torch.bfloat16, backend="eager")
    got = edit(dtype=torch.bfloat16, backend="triton", optimize=Optimizations(attention="fa3"))
    assert_close(got, truth, eager, torch.bfloat16, "fa3 edit")
