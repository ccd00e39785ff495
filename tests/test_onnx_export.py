"""ONNX export of the transformer and the VAE: graphs checked by path, then run in ONNX Runtime (CPU) against the
runtime's eager PyTorch model at token counts and sizes other than the traced ones."""

from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from kontext_rt.export import specs  # noqa: E402
from kontext_rt.export.onnx_export import VAEDecoderGraph, VAEEncoderGraph, export_onnx, transformer_graph  # noqa: E402
from kontext_rt.export.trt_ops import unsupported_ops  # noqa: E402
from tests.onnx_cases import LAYOUTS, VAE_SIZES, cast, load_models, rel_err, run_ort, transformer_inputs, vae_input  # noqa: E402,I001

FP32_BOUND = 1e-5  # ORT and torch run the same fp32 math in different orders


@pytest.fixture(scope="module")
def models(kontext_dir):
    return load_models(kontext_dir)


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """fp32 transformer through both exporters (with external data), fp16 transformer, VAE graphs."""
    model, vae = models
    out = tmp_path_factory.mktemp("onnx")
    t_spec = specs.transformer_spec(model.cfg, text_tokens=8)
    enc_spec, dec_spec = specs.vae_encoder_spec(vae.cfg), specs.vae_decoder_spec(vae.cfg)
    f16 = torch.float16
    return {
        "dynamo": export_onnx(
            transformer_graph(model), t_spec, out / "dynamo" / "transformer.onnx", torch.float32, external_data=True
        ),
        "torchscript": export_onnx(
            transformer_graph(model),
            t_spec,
            out / "ts" / "transformer.onnx",
            torch.float32,
            exporter="torchscript",
            external_data=True,
        ),
        "fp16": export_onnx(transformer_graph(cast(model, f16)), t_spec, out / "fp16" / "transformer.onnx", f16),
        "encoder": export_onnx(VAEEncoderGraph(vae), enc_spec, out / "vae" / "vae_encoder.onnx", torch.float32),
        "decoder": export_onnx(VAEDecoderGraph(vae), dec_spec, out / "vae" / "vae_decoder.onnx", torch.float32),
        "decoder16": export_onnx(VAEDecoderGraph(cast(vae, f16)), dec_spec, out / "vae16" / "vae_decoder.onnx", f16),
        "spec": t_spec,
    }


def _velocity(model, x, dtype=torch.float32):
    """The eager runtime model (reference ops) on the graph's inputs: context tokens inside img."""
    m = cast(model, dtype)
    args = {k: (v.to(dtype) if k in ("img", "txt", "pooled") else v) for k, v in x.items()}
    if dtype == torch.float64:
        args = {k: v.to(dtype) for k, v in args.items()}
    with torch.no_grad():
        return m(
            args["img"],
            None,
            args["txt"],
            args["pooled"],
            args["timesteps"],
            args.get("guidance"),
            args["cos"],
            args["sin"],
        ).double()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_transformer_fp32_matches_torch(exported, models, exporter, layout):
    model, _ = models
    onnx.checker.check_model(str(exported[exporter]), full_check=True)  # by path: works past 2 GB too
    x = transformer_inputs(model.cfg, layout)
    assert rel_err(run_ort(exported[exporter], x), _velocity(model, x)) < FP32_BOUND


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_transformer_fp16_within_torch_fp16_error(exported, models, layout):
    """Bound from the reference: ORT's fp16 error (vs float64) <= 2x torch's own fp16 error + one fp16 ulp."""
    model, _ = models
    x = transformer_inputs(model.cfg, layout)
    truth = _velocity(model, x, torch.float64)
    torch_err = rel_err(_velocity(model, x, torch.float16), truth)
    x16 = {k: (v.half() if k in ("img", "txt", "pooled") else v) for k, v in x.items()}
    assert rel_err(run_ort(exported["fp16"], x16), truth) <= 2 * torch_err + 2**-10


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_external_data_is_saved_and_reloads(exported, exporter):
    path = exported[exporter]
    data = path.with_name(path.name + ".data")
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    graph = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {data.name}
    full = onnx.load(str(path))  # reload with the weights: every initializer resolves
    assert all(len(t.raw_data) or t.data_location == onnx.TensorProto.DEFAULT for t in full.graph.initializer)
    assert not list(path.parent.glob(".*partial*")), "temporary export files left behind"


def test_graph_io_follows_the_contract(exported):
    spec = exported["spec"]
    graph = onnx.load(str(exported["torchscript"]), load_external_data=False)
    assert [i.name for i in graph.graph.input] == [s.name for s in spec.inputs]
    assert [o.name for o in graph.graph.output] == ["velocity"]
    for value, s in zip(graph.graph.input, spec.inputs, strict=True):
        dims = value.type.tensor_type.shape.dim
        for d, want in zip(dims, s.shape, strict=True):
            if isinstance(want, int):
                assert d.dim_value == want, (s.name, want)
            else:
                assert d.dim_param and not d.dim_value, f"{s.name}: {want} is not dynamic"


@pytest.mark.parametrize("size", list(VAE_SIZES))
@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_vae_fp32_matches_torch(exported, models, part, size):
    _, vae = models
    onnx.checker.check_model(str(exported[part]), full_check=True)
    x = vae_input(vae.cfg, size, decoder=part == "decoder")
    with torch.no_grad():
        ref = (vae.decode(x) if part == "decoder" else vae.encode(x)).double()
    name = "latent" if part == "decoder" else "image"
    assert rel_err(run_ort(exported[part], {name: x}), ref) < FP32_BOUND


@pytest.mark.parametrize("size", list(VAE_SIZES))
def test_vae_decoder_fp16_within_torch_fp16_error(exported, models, size):
    _, vae = models
    z = vae_input(vae.cfg, size, decoder=True)
    with torch.no_grad():
        truth = cast(vae, torch.float64).decode(z.double()).double()
        torch_err = rel_err(cast(vae, torch.float16).decode(z.half()).double(), truth)
    assert rel_err(run_ort(exported["decoder16"], {"latent": z.half()}), truth) <= 2 * torch_err + 2**-10


@pytest.mark.parametrize("name", ["dynamo", "torchscript", "fp16", "encoder", "decoder"])
def test_every_op_is_one_the_tensorrt_parser_supports(exported, name):
    assert unsupported_ops(exported[name]) == {}
