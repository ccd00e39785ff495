"""The tensorrt backend up to TensorRT itself: engine lookup, stale and missing engines refused with the export
command, and the optimization profiles against every size the pipeline produces. Building and running engines
needs TensorRT and a CUDA GPU: those tests skip with that reason (benchmarks/gpu/tensorrt_gpu.py runs them there)."""

from __future__ import annotations

import pytest
import torch

from kontext_rt.backends.manifest import GRAPHS, Manifest, engine_folder, file_sizes
from kontext_rt.backends.tensorrt import EngineError, check_engines, locate, pick_profile
from kontext_rt.config import PRESETS, VAE_PRESETS
from kontext_rt.export import specs
from kontext_rt.export.engine_build import profile_shapes
from kontext_rt.image import MULTIPLE, PREFERRED_KONTEXT_RESOLUTIONS
from kontext_rt.weights.formats import detect


def _tensorrt_and_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


NEEDS_TRT = pytest.mark.skipif(
    not _tensorrt_and_gpu(),
    reason="needs TensorRT and a CUDA GPU: TensorRT cannot be "
    "installed on the CPU machines (NVIDIA's index is unreachable, PyPI has stubs)",
)


def _fake_engines(out, fp: str, precision="fp16"):
    folder = engine_folder(out, precision)
    folder.mkdir(parents=True)
    for g in GRAPHS:
        (folder / f"{g}.plan").write_bytes(b"plan" * 10)
        Manifest("engine", g, precision, fp, files=file_sizes(folder / f"{g}.plan")).write(folder / f"{g}.json")
    return folder


def test_matching_engines_pass_the_checks(kontext_dir, tmp_path):
    fp = detect(kontext_dir).fingerprint()
    folder = _fake_engines(tmp_path, fp)
    assert locate(tmp_path, kontext_dir) == folder == locate(folder, kontext_dir)
    assert set(check_engines(folder, fp, kontext_dir)) == set(GRAPHS)


def test_missing_engines_name_the_export_command(kontext_dir, tmp_path):
    with pytest.raises(EngineError, match=f"kontext-rt export --checkpoint {kontext_dir} --out {tmp_path}"):
        locate(tmp_path, kontext_dir)
    folder = _fake_engines(tmp_path, "f")
    (folder / "vae_decoder.json").unlink()
    with pytest.raises(EngineError, match="no finished vae_decoder engine.*rebuild with: kontext-rt export"):
        check_engines(folder, "f", kontext_dir)


def test_stale_engine_is_refused(kontext_dir, tmp_path):
    folder = _fake_engines(tmp_path, "0" * 32)
    fp = detect(kontext_dir).fingerprint()
    with pytest.raises(EngineError, match="stale: built from another checkpoint.*--precision fp16"):
        check_engines(folder, fp, kontext_dir)


def test_changed_plan_file_is_refused(tmp_path):
    folder = _fake_engines(tmp_path, "f")
    (folder / "transformer.plan").write_bytes(b"other")
    with pytest.raises(EngineError, match="transformer.plan missing or changed"):
        check_engines(folder, "f", "ckpt")


def test_several_precisions_need_a_choice(tmp_path):
    _fake_engines(tmp_path, "f", "fp16")
    fp8 = _fake_engines(tmp_path, "f", "fp8")
    with pytest.raises(EngineError, match="engines for fp16, fp8: pick one"):
        locate(tmp_path, "ckpt")
    assert locate(tmp_path, "ckpt", "fp8") == fp8


def test_the_pipeline_refuses_engines_with_another_backend(kontext_dir):
    from kontext_rt import Pipeline

    with pytest.raises(ValueError, match="engines= is only used by backend='tensorrt'"):
        Pipeline.from_pretrained(kontext_dir, backend="eager", engines="x")


def _ranges(spec):
    return [{n: tuple(torch.Size(s) for s in shapes) for n, shapes in p.items()} for p in profile_shapes(spec)]


def test_transformer_profiles_cover_every_edit_and_generate_size():
    cfg = specs.transformer_spec(PRESETS["flux-kontext-dev"], text_tokens=512)
    ranges = _ranges(cfg)
    tokens = [(w // MULTIPLE) * (h // MULTIPLE) for w, h in PREFERRED_KONTEXT_RESOLUTIONS]

    def shapes(img, txt=512):
        return {
            "img": (1, img, 64),
            "txt": (1, txt, 4096),
            "pooled": (1, 768),
            "timesteps": (1,),
            "guidance": (1,),
            "cos": (txt + img, 64),
            "sin": (txt + img, 64),
        }

    for t in tokens:  # an edit at each preferred resolution, output the context's size: the Kontext profile
        assert pick_profile(ranges, shapes(2 * t)) == 0
    for side in (256, 512, 768, 1024):
        assert pick_profile(ranges, shapes((side // 16) ** 2)) in (0, 1)
    assert pick_profile(ranges, shapes(64 * 48, txt=77)) == 1  # 1024x768 text-to-image, short prompt
    with pytest.raises(ValueError, match="outside every optimization profile"):
        pick_profile(ranges, shapes(2 * max(tokens) + 1))


def test_vae_profiles_cover_the_preferred_resolutions():
    enc = _ranges(specs.vae_encoder_spec(VAE_PRESETS["flux"]))
    dec = _ranges(specs.vae_decoder_spec(VAE_PRESETS["flux"]))
    for w, h in PREFERRED_KONTEXT_RESOLUTIONS:
        assert pick_profile(enc, {"image": (1, 3, h, w)}) == 0
        assert pick_profile(dec, {"latent": (1, 16, h // 8, w // 8)}) == 0


class _SpecEngine:
    """An engine with exactly a spec's I/O names: any other input set is refused; each output echoes the first
    input (the transformer's target-then-context tokens, the VAE's image or latent)."""

    def __init__(self, spec):
        self.inputs = [s.name for s in spec.inputs]
        self.outputs = [s.name for s in spec.outputs]
        self.dtypes = {n: torch.float32 for n in self.inputs + self.outputs}
        self.device = torch.device("cpu")

    def __call__(self, **inputs):
        assert sorted(inputs) == sorted(self.inputs), f"bound {sorted(inputs)}, the spec declares {self.inputs}"
        return {n: inputs[self.inputs[0]] for n in self.outputs}


@pytest.mark.parametrize("preset", ["tiny", "tiny-schnell"])
def test_the_backend_binds_exactly_the_spec_names(preset):
    from kontext_rt.backends.tensorrt import TensorRTTransformer, TensorRTVAE

    cfg, vae_cfg = PRESETS[preset], VAE_PRESETS["tiny"]
    model = TensorRTTransformer(_SpecEngine(specs.transformer_spec(cfg)), cfg)
    img, ctx = torch.randn(1, 6, cfg.in_channels), torch.randn(1, 4, cfg.in_channels)
    half = cfg.head_dim // 2
    out = model(
        img,
        ctx,
        torch.randn(1, 3, cfg.context_in_dim),
        torch.randn(1, cfg.vec_in_dim),
        torch.ones(1),
        torch.ones(1),
        torch.randn(13, half),
        torch.randn(13, half),
    )
    assert torch.equal(out, img)  # the target's rows of the velocity output
    vae = TensorRTVAE(
        _SpecEngine(specs.vae_encoder_spec(vae_cfg)), _SpecEngine(specs.vae_decoder_spec(vae_cfg)), vae_cfg
    )
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(vae.decode(vae.encode(x)), x)


@NEEDS_TRT
def test_engine_build_and_run_matches_torch(kontext_dir, tmp_path):
    """fp16 engines vs the eager fp32 model: error <= 2x torch's own fp16 error + one fp16 ulp (habit 7)."""
    from kontext_rt import Pipeline
    from kontext_rt.cli import main

    out = tmp_path / "engines"
    assert main(["export", "--checkpoint", str(kontext_dir), "--out", str(out), "--precision", "fp16"]) == 0
    args = dict(prompt="x", width=256, height=256, steps=2, seed=0, output="latent")  # the smallest profiled size
    truth = Pipeline.from_pretrained(kontext_dir, device="cuda").generate(**args)
    torch16 = Pipeline.from_pretrained(kontext_dir, device="cuda", dtype=torch.float16).generate(**args)
    engine = Pipeline.from_pretrained(
        kontext_dir, device="cuda", dtype=torch.float16, backend="tensorrt", engines=out
    ).generate(**args)

    def err(x):
        return float((x - truth).abs().max() / truth.abs().max())

    assert err(engine) <= 2 * err(torch16) + 2**-10
