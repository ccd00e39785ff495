"""The eager forward asks no more of a GPU than diffusers' does, counted on meta tensors
(benchmarks/gpu/op_traffic.py): not a timing, the bytes its non-matmul ops read and write and the kernels it
launches. Issue 31 found the eager step 10% slower than diffusers' on an H200, and the count found why:
float32 copies of q and k in the QK norm and RoPE (352 against 272 GB per Kontext step, 3141 against 2674
launches; benchmarks/results/cpu-op-traffic-2026-12-07). This keeps them from coming back."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kontext_rt.config import PRESETS
from tests import bench_scripts

pytest.importorskip("diffusers")


def test_eager_moves_fewer_bytes_and_launches_fewer_kernels_than_diffusers():
    """Full width and head dim (the per-block traffic of the real model), two blocks of each kind, 64 text +
    256 target + 256 context tokens. Before the mend the eager forward moved 1.27x diffusers' bytes here."""
    traffic = bench_scripts.load("gpu/op_traffic.py")
    cfg = dataclasses.replace(PRESETS["flux-kontext-dev"], depth=2, depth_single_blocks=2)
    layout = (64, 256, 256)
    eager = traffic.totals(traffic.count(*traffic.runtime_model(cfg, layout, torch.bfloat16)))
    theirs = traffic.totals(traffic.count(*traffic.diffusers_model(cfg, layout, torch.bfloat16)))
    assert eager["matmul_tflop"] == pytest.approx(theirs["matmul_tflop"], rel=1e-3)  # the same work, counted
    assert eager["non_matmul_gb"] <= theirs["non_matmul_gb"], (eager, theirs)
    assert eager["launches"] <= theirs["launches"], (eager, theirs)


def test_the_triton_fp8_step_counts_its_scaled_mm_as_the_same_matmul_work():
    """The triton table's custom ops are one launch each, and FP8 linears' torch._scaled_mm are matmuls: the
    hoisted FP8 step does the FLOPs of the bf16 one (the modulation table made before it, not counted), in fewer
    launches than the eager step."""
    pytest.importorskip("triton")
    traffic = bench_scripts.load("gpu/op_traffic.py")
    cfg = dataclasses.replace(PRESETS["flux-kontext-dev"], depth=2, depth_single_blocks=2)
    layout = (64, 256, 256)
    step = {
        fp8: traffic.count(*traffic.runtime_model(cfg, layout, torch.bfloat16, "triton", fp8, hoisted=True))
        for fp8 in (False, True)
    }
    ops = {k[1] for k in step[True].rows}
    assert {"kontext_rt.qk_norm_rope", "kontext_rt.quantize_rows", "aten._scaled_mm"} <= ops, ops
    bf16, fp8 = (traffic.totals(t) for t in step.values())
    eager = traffic.totals(traffic.count(*traffic.runtime_model(cfg, layout, torch.bfloat16, hoisted=True)))
    assert fp8["matmul_tflop"] == pytest.approx(bf16["matmul_tflop"], rel=1e-9)
    assert fp8["matmul_gb"] < bf16["matmul_gb"]  # e4m3 weights and activations
    assert bf16["launches"] < eager["launches"] and bf16["non_matmul_gb"] < eager["non_matmul_gb"]
