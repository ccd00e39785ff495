"""FP8 with ModelOpt on the tiny model: calibration through the real pipeline, the recipe's layer choice, the
Q/DQ graph TensorRT consumes, an ORT run of that graph's semantics, and the saved calibration state."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt.torch.quantization")

from PIL import Image  # noqa: E402

import kontext_rt as krt  # noqa: E402
from kontext_rt.export import fp8, specs  # noqa: E402
from kontext_rt.export.onnx_export import export_onnx, transformer_graph  # noqa: E402
from kontext_rt.export.trt_ops import unsupported_ops  # noqa: E402
from kontext_rt.weights.formats import detect  # noqa: E402
from kontext_rt.weights.safetensors_io import CheckpointError  # noqa: E402
from tests.onnx_cases import LAYOUTS, rel_err, run_ort, standard_fp8_qdq, transformer_inputs  # noqa: E402

# Written independently of fp8.HIGH_PRECISION: the block linears that carry the FLOPs.
BLOCK_LINEAR = re.compile(
    r"double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])"
    r"|single_blocks\.\d+\.linear[12]"
)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def calibrated(kontext_dir, tmp_path_factory):
    pipe = krt.Pipeline.from_pretrained(kontext_dir, max_sequence_length=8)
    data = fp8.CalibrationSet(
        prompts=fp8.DEFAULT_PROMPTS[:3], images=(_image(0), _image(1)), steps=2, auto_resize=False
    )
    seen = []
    fp8.quantize(pipe.transformer, fp8.calibration_loop(pipe, data, progress=seen.append))
    assert seen == ["calibration 1/3", "calibration 2/3", "calibration 3/3"]
    out = tmp_path_factory.mktemp("fp8")
    spec = specs.transformer_spec(pipe.transformer.cfg, text_tokens=8)
    path = export_onnx(
        transformer_graph(pipe.transformer), spec, out / "transformer.onnx", torch.float32, exporter="torchscript"
    )
    return pipe, path, out


def test_recipe_quantizes_the_block_linears_and_nothing_else(calibrated):
    pipe, _, _ = calibrated
    layers = fp8.linear_layers(pipe.transformer)
    assert layers, "no linear layers found"
    for name, quantized in layers.items():
        assert quantized == bool(BLOCK_LINEAR.fullmatch(name)), name
    assert any(not q for q in layers.values()) and any(layers.values())


def test_every_quantizer_was_calibrated(calibrated):
    pipe, _, _ = calibrated
    for name, quantized in fp8.linear_layers(pipe.transformer).items():
        if quantized:
            module = pipe.transformer.get_submodule(name)
            for q in (module.input_quantizer, module.weight_quantizer):
                assert q.amax is not None and torch.isfinite(q.amax).all() and (q.amax > 0).all(), name


def _find_weight(inits: dict, w: np.ndarray) -> str:
    hits = [k for k, a in inits.items() if np.array_equal(a, w) or np.array_equal(a, w.T)]
    assert len(hits) == 1, f"weight found {len(hits)} times"
    return hits[0]


def _consumer_matmul(graph, start: str) -> tuple[object, list[str]]:
    """Follow the single chain of consumers from a weight to the MatMul/Gemm that reads it: (node, ops on the way)."""
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    name, ops = start, []
    while True:
        (node,) = consumers[name]
        if node.op_type in ("MatMul", "Gemm"):
            return node, ops
        ops.append(node.op_type)
        name = node.output[0]


def test_qdq_on_every_fp8_linear_and_none_on_the_others(calibrated):
    pipe, path, _ = calibrated
    graph = onnx.load(str(path)).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    for name, quantized in fp8.linear_layers(pipe.transformer).items():
        weight = pipe.transformer.get_submodule(name).weight.detach().numpy()
        node, path_ops = _consumer_matmul(graph, _find_weight(inits, weight))
        weight_qdq = "TRT_FP8DequantizeLinear" in path_ops and "TRT_FP8QuantizeLinear" in path_ops
        act = producers.get(node.input[0])
        act_qdq = act is not None and act.op_type == "TRT_FP8DequantizeLinear"
        assert weight_qdq == quantized and act_qdq == quantized, (name, path_ops, act and act.op_type)
    assert unsupported_ops(path) == {}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_qdq_graph_semantics_match_torch_fake_quant(calibrated, kontext_dir, layout):
    """ORT runs the graph with the Q/DQ nodes moved to the standard domain. This checks what the graph *means*
    (scales, placement, saturation), not TensorRT's FP8 kernels, which only a GPU with TensorRT can run.

    Bound: the graph reproduces the fake-quant model to within 5% of the quantization's own effect."""
    import onnxruntime as ort

    pipe, path, out = calibrated
    std = out / f"std-{layout}.onnx"
    onnx.save(standard_fp8_qdq(onnx.load(str(path))), str(std))
    x = transformer_inputs(pipe.transformer.cfg, layout)
    graph = transformer_graph(pipe.transformer)
    plain = transformer_graph(detect(kontext_dir).load_transformer(torch.float32, "cpu"))
    with torch.no_grad():
        fake_quant, unquantized = graph(*x.values()).double(), plain(*x.values()).double()
    effect = rel_err(fake_quant, unquantized)
    assert effect > 1e-4, "the quantizers did nothing"
    got = run_ort(std, x, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    assert rel_err(got, fake_quant) < 0.05 * effect


def test_calibration_state_round_trips_exactly(calibrated, kontext_dir):
    pipe, _, out = calibrated
    layout = detect(kontext_dir)
    path = fp8.save_calibration(pipe.transformer, out / "fp8.safetensors", layout.fingerprint())
    fresh = layout.load_transformer(torch.float32, "cpu")
    fp8.restore_calibration(fresh, path, layout.fingerprint())
    x = transformer_inputs(fresh.cfg, "edit")
    with torch.no_grad():
        assert torch.equal(transformer_graph(fresh)(*x.values()), transformer_graph(pipe.transformer)(*x.values()))


def test_calibration_for_another_checkpoint_is_refused(calibrated, kontext_dir):
    pipe, _, out = calibrated
    layout = detect(kontext_dir)
    path = fp8.save_calibration(pipe.transformer, out / "other.safetensors", "0" * 32)
    with pytest.raises(CheckpointError, match="another checkpoint"):
        fp8.restore_calibration(layout.load_transformer(torch.float32, "cpu"), path, layout.fingerprint())


def test_calibration_missing_quantizers_is_refused(calibrated, kontext_dir):
    from safetensors.torch import load_file, save_file

    pipe, _, out = calibrated
    layout = detect(kontext_dir)
    path = fp8.save_calibration(pipe.transformer, out / "partial.safetensors", layout.fingerprint())
    state = load_file(str(path))
    meta = fp8.calibration_metadata(path)
    state.pop(next(k for k in state if "single_blocks.1.linear2.input" in k))
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="no amax for 1 quantizers"):
        fp8.restore_calibration(layout.load_transformer(torch.float32, "cpu"), path, layout.fingerprint())


def test_bf16_fp8_graph_exports_for_tensorrt(calibrated, kontext_dir, tmp_path):
    """The production base dtype: bf16 around the FP8 GEMMs (ORT cannot run it on the CPU; parser ops checked)."""
    pipe, _, _ = calibrated
    model = detect(kontext_dir).load_transformer(torch.bfloat16, "cpu")
    fp8.restore_calibration(model, fp8.save_calibration(pipe.transformer, tmp_path / "c.safetensors", "x"), "x")
    spec = specs.transformer_spec(model.cfg, text_tokens=8)
    path = export_onnx(transformer_graph(model), spec, tmp_path / "t.onnx", torch.bfloat16, exporter="torchscript")
    graph = onnx.load(str(path))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("TRT_FP8QuantizeLinear") == 2 * sum(fp8.linear_layers(model).values())
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    assert unsupported_ops(path) == {}
