"""TensorRT engine builds from the exported ONNX graphs (TensorRT 10 Python API, imported lazily).

Every build is strongly typed: the ONNX graph already carries the precision (fp16 or bf16 tensors; FP8 Q/DQ nodes
around the quantized GEMMs), so TensorRT keeps each tensor's type instead of choosing precisions itself, and the
FP8 graph's high-precision layers stay in bf16. One optimization profile per entry of the graph's spec (Kontext
edits and text-to-image for the transformer), and a timing cache shared by the builds of one export folder.

TensorRT cannot be installed on the machines this project is developed on: everything up to the builder's inputs
(profiles, shapes, the parser check) is tested there; the build itself runs on a GPU machine with TensorRT
(benchmarks/gpu/tensorrt_gpu.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from kontext_rt.errors import BackendUnavailable
from kontext_rt.export.specs import GraphSpec


class TensorRTUnavailable(BackendUnavailable):
    pass


def require_tensorrt():
    """The tensorrt module, or an error that says what to do instead."""
    try:
        import tensorrt
    except ImportError as err:  # PyPI's tensorrt stubs fail here too (libnvinfer / libnvonnxparser missing)
        raise TensorRTUnavailable(
            f"TensorRT is not importable here ({err}): run the export with --onnx-only, then the same command "
            "without it on a machine with TensorRT and the GPU the engines are for (finished stages are reused)"
        ) from err
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            "building TensorRT engines needs the CUDA GPU they will run on; none is visible (use --onnx-only here)"
        )
    return tensorrt


def profile_shapes(spec: GraphSpec) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """Per profile: {input name: (min, opt, max) shape}, checked to be ordered min <= opt <= max."""
    out = []
    for profile in spec.profiles:
        shapes = {s.name: profile.shapes(s) for s in spec.inputs}
        for name, (lo, opt, hi) in shapes.items():
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
                raise ValueError(f"{spec.name} profile {profile.name}: {name} shapes {lo} <= {opt} <= {hi} fail")
        out.append(shapes)
    return out


def build_engine(
    onnx_path: Path, plan_path: Path, spec: GraphSpec, timing_cache: Path, workspace_gib: float | None = None
) -> dict:
    """Parse onnx_path, build with spec's profiles, write plan_path atomically. Returns build facts."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for shapes in profile_shapes(spec):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    seconds = time.perf_counter() - t0
    tmp = plan_path.with_name(f".{plan_path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(plan)
    os.replace(tmp, plan_path)
    cache_tmp = timing_cache.with_name(f".{timing_cache.name}.partial")
    cache_tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    os.replace(cache_tmp, timing_cache)
    return {"build_seconds": round(seconds, 1), "plan_bytes": len(plan)}


def tensorrt_version() -> str:
    return require_tensorrt().__version__


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()
