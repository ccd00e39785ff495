"""benchmarks/quality/quality_report.py on a tiny random-weight checkpoint: its per-step drift, its ONNX Runtime
denoiser, its refusals and its files. The numbers of a random model mean nothing; what is checked is how they are
made."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kontext_rt.config import PRESETS, VAE_PRESETS
from kontext_rt.model.rope import rope_table, sequence_ids
from kontext_rt.model.transformer import FluxTransformer
from kontext_rt.model.vae import AutoEncoder
from kontext_toy import harness, shapes
from kontext_toy.checkpoints import write_diffusers_checkpoint
from tests import bench_scripts
from tests.float64_reference import rel_err

F32_EPS = 2.0**-24  # float32's unit roundoff


def _script():
    """The script under test, loaded by its path."""
    return bench_scripts.load("quality/quality_report.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny presets, every 1-D parameter jittered (norm scales start at exactly 1), as a diffusers folder."""
    gen = torch.Generator().manual_seed(11)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model, vae = FluxTransformer(PRESETS["tiny"]), AutoEncoder(VAE_PRESETS["tiny"])
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    folder = tmp_path_factory.mktemp("tiny-kontext")
    write_diffusers_checkpoint(folder, model, vae, seed=11)
    return folder


@pytest.fixture(scope="module")
def cfg(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return _script().Config(checkpoint, out / "r.json", out / "r.png", n=2, turns=1, steps=3)


SAMPLES = list(shapes.dataset("heldout", 3, seed=2, kinds=("recolour", "move", shapes.GEN_KIND)))


def test_per_step_drift_is_zero_against_itself_and_is_the_latent_rms_against_another(cfg):
    qr = _script()
    pipe = qr.load(cfg)
    same = qr.step_drift(qr.trajectories(pipe, SAMPLES, 3, 5), qr.trajectories(pipe, SAMPLES, 3, 5))
    assert same["rms"] == [0.0, 0.0, 0.0] and same["final_image_psnr"] == harness.PSNR_CAP
    assert all(r > 0.1 for r in same["reference_rms"])  # latents of noise scale, not empty states
    other = qr.load(cfg)
    with torch.no_grad():
        w = other.transformer.final_layer.linear.weight
        w.add_(1e-3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    drift = qr.step_drift(qr.trajectories(pipe, SAMPLES, 3, 5), qr.trajectories(other, SAMPLES, 3, 5))
    assert len(drift["rms"]) == 3 and all(r > 0 for r in drift["rms"])
    # the last step, from the public API alone: each edit sample's latent output at seed 5 + its index
    edits = [(i, s) for i, s in enumerate(SAMPLES) if isinstance(s, shapes.EditSample)]
    mse, pair = [], (pipe, other)
    for i, s in edits:
        a, b = (p.edit(s.source, s.instruction, steps=3, seed=5 + i, auto_resize=False, output="latent") for p in pair)
        mse.append(float(((b.double() - a.double()) ** 2).mean()))
    assert drift["rms"][-1] == pytest.approx((sum(mse) / len(mse)) ** 0.5, rel=1e-12)
    assert drift["final_image_psnr"] < harness.PSNR_CAP


def _model_inputs(cfg, dtype):
    """Model-call inputs of an edit at 64 x 64 px: 4 x 4 target and context tokens, 64 text tokens."""
    gen = torch.Generator().manual_seed(3)
    cos, sin = rope_table(sequence_ids(64, [(4, 4), (4, 4)]), cfg.axes_dim, cfg.theta)
    img, ctx = (torch.randn(1, 16, cfg.in_channels, generator=gen) for _ in range(2))
    txt, pooled = torch.randn(1, 64, cfg.context_in_dim, generator=gen), torch.randn(1, cfg.vec_in_dim, generator=gen)
    wide = torch.float64 if dtype == torch.float64 else torch.float32  # sigma, guidance and RoPE: float32 at least
    inputs = [t.to(dtype) for t in (img, ctx, txt, pooled)]
    return (*inputs, *(t.to(wide) for t in (torch.tensor([0.7]), torch.tensor([2.5]), cos, sin)))


def test_ort_denoiser_is_the_eager_model_within_float32_rounding(cfg, tmp_path):
    """Bound (from the reference): the ORT velocity's error against the model run in float64 is at most twice the
    eager float32 model's own error against it, plus float32's unit roundoff. The graph comes from the torchscript
    exporter here (a second, not 18); tests/test_onnx_export.py checks the dynamo graph against torch."""
    pytest.importorskip("onnxruntime")
    qr = _script()
    pipe = qr.ort_pipeline(cfg, tmp_path, exporter="torchscript")
    model = pipe.transformer
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(*_model_inputs(model.cfg, torch.float64))
        eager = model(*_model_inputs(model.cfg, torch.float32)).double()
    ort = pipe.denoiser.velocity(*_model_inputs(model.cfg, torch.float32)).double()
    assert ort.shape == truth.shape == (1, 16, model.cfg.in_channels)  # the target tokens' velocity only
    assert truth.abs().max() > 0.1  # a velocity worth comparing
    torch_err = rel_err(eager, truth)
    assert 0 < torch_err and rel_err(ort, truth) <= 2 * torch_err + F32_EPS
    # and the pipeline runs its steps through ORT
    calls = []
    velocity = pipe.denoiser.velocity
    pipe.denoiser.velocity = lambda *a: calls.append(1) or velocity(*a)
    s = SAMPLES[0]
    out = pipe.edit(s.source, s.instruction, steps=3, seed=0, auto_resize=False, output="latent")
    assert len(calls) == 3 and torch.isfinite(out).all()


BAD = {
    "missing checkpoint": (["--checkpoint", "{tmp}/nowhere"], "no such folder"),
    "n below one": (["--n", "0"], "--n must be at least 1"),
    "missing output folder": (["--out-json", "{tmp}/no/r.json"], "does not exist"),
    "unknown option": (["--options", "bf16,int4"], "unknown int4"),
    "same output file": (["--out-png", "{tmp}/r.json"], "name the same file"),
    "negative turns": (["--turns", "-1"], "--turns must be at least 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_are_refused_before_any_work(case, checkpoint, tmp_path, monkeypatch, capsys):
    qr = _script()
    monkeypatch.setattr(qr, "report", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(qr, "load", lambda *a, **k: pytest.fail("a pipeline was loaded"))
    base = {"--checkpoint": str(checkpoint), "--out-json": f"{tmp_path}/r.json", "--out-png": f"{tmp_path}/r.png"}
    extra, message = BAD[case]
    argv = {**base, **dict(zip(extra[::2], extra[1::2], strict=True))}
    args = [x.replace("{tmp}", str(tmp_path)) for kv in argv.items() for x in kv]
    with pytest.raises(SystemExit) as err:
        qr.main(args)
    assert err.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_report_files_are_valid_json_and_a_png(cfg):
    qr = _script()
    argv = ["--checkpoint", str(cfg.checkpoint), "--out-json", str(cfg.out_json), "--out-png", str(cfg.out_png)]
    assert qr.main([*argv, "--n", "2", "--turns", "1", "--steps", "3", "--options", "bf16,steps"]) == 0
    reject = lambda c: pytest.fail(f"{c} in the JSON")
    r = json.loads(cfg.out_json.read_text(), parse_constant=reject)
    assert cfg.out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in cfg.out_json.parent.iterdir()) == ["r.json", "r.png"]  # no partial files left
    assert r["samples"]["n"] == 2 and r["machine"]["threads"] == 1 and r["machine"]["versions"]["torch"]
    assert len(r["checkpoint"]["weights_sha256"]) == 64
    precision, schedule = r["groups"]["precision"], r["groups"]["schedule"]
    assert list(precision["options"]) == ["fp32", "bf16"] and precision["reference"] == "fp32"
    ref = precision["options"]["fp32"]
    assert ref["output_psnr"] == harness.PSNR_CAP and all(v == 0 for v in ref["delta"].values())
    assert ref["quality"]["drift"]["turns"] == 1 and ref["time"]["edit_median_s"] > 0
    for steps in (28, 8, 4):
        option = schedule["options"][f"steps-{steps}"]
        assert option["quality"]["steps"] == steps and option["time"]["steps_run"] == [steps]
    assert precision["options"]["bf16"]["time"]["steps_run"] == [3]
    assert len(r["per_step_drift"]["options"]["bf16"]["rms"]) == 3
    assert {"cuda-graphs", "tensorrt"} <= set(r["not_run"])


def test_the_committed_report_names_the_shipped_weights():
    """The latest committed quality report (benchmarks/results/*-quality-small-kontext-<date>/) is the shipped
    model's: its digest is the shipped folder's (computed here by its definition: each .safetensors file's relative
    path, a NUL, its bytes, in sorted order). New weights without a new report fail here."""
    import hashlib

    from kontext_toy.checkpoints import small_kontext

    folder = small_kontext()
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    reports = (bench_scripts.BENCH / "results").glob("*-quality-small-kontext-*/quality.json")
    report = max(reports, key=lambda p: p.parent.name.rsplit("-", 3)[-3:])  # the latest date
    committed = json.loads(report.read_text())
    assert committed["checkpoint"]["weights_sha256"] == h.hexdigest() == _script().checkpoint_sha256(folder)


@pytest.mark.parametrize("smooth_k", [False, True], ids=["plain", "smooth-k"])
def test_fp8_attention_option_runs_the_emulated_fa3_fp8_path(cfg, smooth_k):
    """The fp8-attention options are the bf16 model with its attention replaced by the reference pre-pass in e4m3
    (smooth_k as named) and emulated FP8 attention: the same velocity, bit for bit, and not bf16's."""
    from dataclasses import replace

    from kontext_rt.kernels import reference
    from kontext_rt.model.op_table import EAGER_OPS

    def emulated(q, k, v, q_scales, k_scales, split, cos, sin):
        pre = reference.attention_prepass(q, k, v, q_scales, k_scales, split, cos, sin, fp8=True, smooth_k=smooth_k)
        return reference.attention_fp8_emulated(*pre)

    pipe = _script().fp8_attention_pipeline(cfg, smooth_k)
    model = pipe.transformer
    inputs = _model_inputs(model.cfg, torch.bfloat16)
    with torch.no_grad():
        got = model(*inputs, ops=pipe.denoiser.ops)
        want = model(*inputs, ops=replace(EAGER_OPS, attention=emulated))
        bf16 = model(*inputs, ops=EAGER_OPS)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert not torch.equal(got, bf16)
