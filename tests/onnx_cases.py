"""Shared pieces of the export tests: tiny models from the real checkpoint, real layouts, ORT runs."""

from __future__ import annotations

import copy

import numpy as np
import torch

from kontext_rt.model.rope import rope_table, sequence_ids
from kontext_rt.weights.formats import detect

# (batch, text tokens, [target grid, context grids...]): an edit, and text-to-image at other counts and batch
LAYOUTS = {"edit": (1, 7, [(3, 4), (3, 4)]), "t2i": (3, 5, [(2, 5)])}
VAE_SIZES = {"small": (1, 32, 48), "wide": (3, 48, 80)}  # (batch, height, width) in pixels


def load_models(checkpoint):
    layout = detect(checkpoint)
    return layout.load_transformer(torch.float32, "cpu"), layout.load_vae(torch.float32, "cpu")


def cast(module, dtype):
    return copy.deepcopy(module).to(dtype)


def transformer_inputs(cfg, layout: str, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    batch, text, grids = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(r * c for r, c in grids)
    cos, sin = rope_table(sequence_ids(text, grids), cfg.axes_dim, cfg.theta)
    x = {
        "img": torch.randn(batch, tokens, cfg.in_channels, generator=gen).to(dtype),
        "txt": torch.randn(batch, text, cfg.context_in_dim, generator=gen).to(dtype),
        "pooled": torch.randn(batch, cfg.vec_in_dim, generator=gen).to(dtype),
        "timesteps": torch.rand(batch, generator=gen),
    }
    if cfg.guidance_embed:
        x["guidance"] = torch.full((batch,), 2.5)
    return {**x, "cos": cos, "sin": sin}


def vae_input(cfg, size: str, decoder: bool, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    batch, h, w = VAE_SIZES[size]
    gen = torch.Generator().manual_seed(seed)
    if decoder:
        return torch.randn(batch, cfg.z_channels, h // cfg.downscale, w // cfg.downscale, generator=gen).to(dtype)
    return (torch.rand(batch, cfg.in_channels, h, w, generator=gen) * 2 - 1).to(dtype)


def run_ort(path, inputs: dict[str, torch.Tensor], opt_level=None) -> torch.Tensor:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if opt_level is not None:
        options.graph_optimization_level = opt_level
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    assert wanted == set(inputs), f"graph inputs {sorted(wanted)} vs {sorted(inputs)}"
    out = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    return torch.from_numpy(np.asarray(out, dtype=np.float64))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def standard_fp8_qdq(model):
    """TensorRT's FP8 Q/DQ custom ops rewritten as the standard opset-19+ ops ORT runs (same math: x / scale,
    saturated to e4m3; q * scale). For a numeric check of the graph's semantics only."""
    import onnx

    model = copy.deepcopy(model)
    zero = onnx.helper.make_tensor("fp8_e4m3_zero", onnx.TensorProto.FLOAT8E4M3FN, [], [0.0])
    renamed = set()
    for node in model.graph.node:
        if node.domain == "trt" and node.op_type in ("TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"):
            quantize = node.op_type == "TRT_FP8QuantizeLinear"
            node.domain, node.op_type = "", "QuantizeLinear" if quantize else "DequantizeLinear"
            if quantize:
                node.input.append(zero.name)
                renamed.update(node.output)
    model.graph.initializer.append(zero)
    kept = [v for v in model.graph.value_info if v.name not in renamed]  # typed uint8 by the exporter
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    kept_imports = [o for o in model.opset_import if o.domain != "trt"]
    del model.opset_import[:]
    model.opset_import.extend(kept_imports)
    return model
