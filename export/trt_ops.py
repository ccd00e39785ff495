"""A static check that TensorRT's ONNX parser can read a graph: every op, and the opset, against the parser's
own support list for the targeted TensorRT version (data/tensorrt_onnx_ops.json, with its source).

It runs without TensorRT, so an export on a machine without it still fails early on a graph no engine could be
built from (an opset-23 `Attention` for an older parser, a `DynamicQuantizeLinear`, an unknown custom domain).
"""

from __future__ import annotations

import json
from collections import Counter
from functools import cache
from importlib import resources
from pathlib import Path

STANDARD_DOMAINS = ("", "ai.onnx")


@cache
def support_table() -> dict:
    """The parser's support list (read-only; cached, the file never changes at run time)."""
    return json.loads(resources.files(__package__).joinpath("data/tensorrt_onnx_ops.json").read_text())


def unsupported_ops(model_or_path) -> dict[str, int]:
    """{"domain::Op" or "opset N": count} of what the targeted parser cannot read; empty when all is readable.

    Nodes inside ONNX functions and control-flow subgraphs are checked too. Weights are not loaded.
    """
    import onnx

    model = model_or_path
    if isinstance(model_or_path, (str, Path)):
        model = onnx.load(str(model_or_path), load_external_data=False)
    table = support_table()
    lo, hi = table["opset"]
    standard, custom = set(table["ops"]), {d: set(ops) for d, ops in table["custom_ops"].items()}
    functions = {(f.domain, f.name) for f in model.functions}
    bad: Counter = Counter()
    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS and not lo <= imp.version <= hi:
            bad[f"opset {imp.version}"] += 1
    for node in _nodes(model):
        if (node.domain, node.op_type) in functions:
            continue  # a local function: its body is checked
        if node.domain in STANDARD_DOMAINS:
            ok = node.op_type in standard
        else:
            ok = node.op_type in custom.get(node.domain, ())
        if not ok:
            bad[f"{node.domain or 'ai.onnx'}::{node.op_type}"] += 1
    return dict(bad)


def _nodes(model):
    import onnx

    stack = [model.graph.node, *(f.node for f in model.functions)]
    while stack:
        for node in stack.pop():
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g.node)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(g.node for g in attr.graphs)


def check_parsable(path) -> None:
    """Raise ValueError naming every op the targeted TensorRT parser lacks."""
    bad = unsupported_ops(path)
    if bad:
        listed = ", ".join(f"{k} x{v}" for k, v in sorted(bad.items()))
        raise ValueError(f"{path}: TensorRT {support_table()['tensorrt']}'s ONNX parser cannot read: {listed}")
