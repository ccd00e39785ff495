"""Trace the runtime's own modules to ONNX: the transformer, the VAE encoder and the VAE decoder.

Two exporters, chosen by what the graph needs:
- "dynamo" (torch.export based, opset 20), for fp32/fp16/bf16 graphs. It keeps the weights as references to the
  module's tensors and streams them into the external-data file while saving, so peak host memory stays near one
  copy of the weights (benchmarks/e2e/export_memory.py measures it).
- "torchscript" (the legacy tracer), for ModelOpt's FP8 graphs: only it calls the quantizers' ONNX symbolics that
  emit TensorRT's FP8 Q/DQ nodes.
Both trace the model with export/graph_ops.EXPORT_OPS and mark every named dim of the I/O contract dynamic.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from kontext_rt.backends import graph_io as io
from kontext_rt.export.graph_ops import EXPORT_OPS
from kontext_rt.export.specs import GraphSpec
from kontext_rt.model.transformer import FluxTransformer
from kontext_rt.model.vae import AutoEncoder

OPSET = 20
PROTOBUF_LIMIT = 2**31  # a ModelProto cannot exceed 2 GB: larger graphs keep their weights in external data
EXPORTERS = ("dynamo", "torchscript")


class TransformerGraph(nn.Module):
    """The transformer with the context tokens already appended to `img`; returns every img token's velocity."""

    def __init__(self, model: FluxTransformer):
        super().__init__()
        self.model = model

    def forward(self, img, txt, pooled, timesteps, guidance, cos, sin):
        return self.model(img, None, txt, pooled, timesteps, guidance, cos, sin, EXPORT_OPS)


class _UnguidedTransformerGraph(TransformerGraph):
    """schnell: no guidance input (the exporters need the exact argument list)."""

    def forward(self, img, txt, pooled, timesteps, cos, sin):
        return self.model(img, None, txt, pooled, timesteps, None, cos, sin, EXPORT_OPS)


def transformer_graph(model: FluxTransformer) -> TransformerGraph:
    return (TransformerGraph if model.cfg.guidance_embed else _UnguidedTransformerGraph)(model)


class VAEEncoderGraph(nn.Module):
    def __init__(self, vae: AutoEncoder):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image)


class VAEDecoderGraph(nn.Module):
    def __init__(self, vae: AutoEncoder):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent)


def example_inputs(spec: GraphSpec, dtype: torch.dtype, device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs at the spec's example sizes (timesteps in [0, 1), guidance 2.5)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in spec.inputs:
        shape = spec.example_shape(s)
        if s.name == io.TIMESTEPS:
            t = torch.rand(shape, generator=gen)
        elif s.name == io.GUIDANCE:
            t = torch.full(shape, 2.5)
        else:
            t = torch.randn(shape, generator=gen)
        out.append(t.to(device, spec.dtype_of(s, dtype)))
    return tuple(out)


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def export_onnx(
    graph: nn.Module,
    spec: GraphSpec,
    path: Path,
    dtype: torch.dtype,
    exporter: str = "dynamo",
    external_data: bool | None = None,
) -> Path:
    """Write graph to path (an .onnx file; weights in path + '.data' when external). Returns path.

    external_data None: only when the weights would push the protobuf past 2 GB. The file is written under a
    temporary name and renamed, so an interrupted export never leaves a graph that looks finished.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(graph.parameters()).device
    args = example_inputs(spec, dtype, device)
    if external_data is None:
        external_data = weight_bytes(graph) > PROTOBUF_LIMIT * 0.9
    tmp = path.with_name(f".{path.name}.partial")
    data = path.with_name(path.name + ".data")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter chatter; correctness is checked by the tests
        if exporter == "dynamo":
            _dynamo(graph, spec, args, tmp, external_data)
        else:
            _torchscript(graph, spec, args, tmp, external_data)
    tmp_data = tmp.with_name(tmp.name + ".data")
    if tmp_data.exists():  # the graph names its data file: keep the name it was saved with, beside the final file
        _rename_external_data(tmp, tmp_data.name, data.name)
        os.replace(tmp_data, data)
    elif data.exists():
        data.unlink()
    os.replace(tmp, path)
    return path


def _dynamo(graph, spec: GraphSpec, args, tmp: Path, external_data: bool):
    auto = torch.export.Dim.AUTO
    dynamic = {s.name: {i: auto for i, d in enumerate(s.shape) if isinstance(d, str)} for s in spec.inputs}
    program = torch.onnx.export(
        graph,
        args,
        dynamo=True,
        opset_version=OPSET,
        dynamic_shapes=tuple(dynamic.values()),
        input_names=[s.name for s in spec.inputs],
        output_names=[s.name for s in spec.outputs],
        verbose=False,
    )
    program.save(str(tmp), external_data=external_data)


def _torchscript(graph, spec: GraphSpec, args, tmp: Path, external_data: bool):
    """The legacy tracer copies every weight into its graph and then into the protobuf (4x the weights at peak,
    measured). So it exports the graph alone (export_params=False: each weight becomes an input named by its
    state-dict key, nothing folded), and the weights are then streamed from the module into the file one tensor
    at a time."""
    import onnx

    axes = {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in (*spec.inputs, *spec.outputs)}
    scratch = tmp.with_name(tmp.name + ".d")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        torch.onnx.export(
            graph,
            args,
            str(scratch / "graph.onnx"),
            dynamo=False,
            opset_version=OPSET,
            export_params=False,
            do_constant_folding=False,
            input_names=[s.name for s in spec.inputs],
            output_names=[s.name for s in spec.outputs],
            dynamic_axes=axes,
        )
        model = onnx.load(str(scratch / "graph.onnx"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    data = tmp.with_name(tmp.name + ".data") if external_data else None
    _attach_weights(model, graph.state_dict(keep_vars=True), {s.name for s in spec.inputs}, data)
    onnx.save_model(model, str(tmp))


def _attach_weights(model, state: dict, real_inputs: set[str], data: Path | None):
    """Turn the graph's weight inputs into initializers holding the module's tensors, inline or in `data`."""
    import onnx

    inputs = list(model.graph.input)
    del model.graph.input[:]
    out = open(data, "wb") if data is not None else None  # noqa: SIM115 (closed below, also on error)
    try:
        offset = 0
        for value in inputs:
            if value.name in real_inputs:
                model.graph.input.append(value)
                continue
            if value.name not in state:
                raise RuntimeError(f"exported graph input {value.name!r} is neither an input nor a weight")
            t = state[value.name].detach().cpu().contiguous()
            raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            proto = onnx.TensorProto(name=value.name, data_type=value.type.tensor_type.elem_type, dims=t.shape)
            if out is None:
                proto.raw_data = raw
            else:
                out.write(raw)
                proto.data_location = onnx.TensorProto.EXTERNAL
                for key, v in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                    proto.external_data.add(key=key, value=v)
                offset += len(raw)
            model.graph.initializer.append(proto)
    finally:
        if out is not None:
            out.close()


def _rename_external_data(model_path: Path, old: str, new: str):
    """Point every external tensor of the graph at the data file's final name (the protobuf stores the name)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in _external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(model, str(model_path))


def _external_tensors(model):
    import onnx

    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                yield attr.t
