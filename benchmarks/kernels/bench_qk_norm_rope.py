"""Fused QK RMSNorm + RoPE vs the eager torch ops, bf16, FLUX.1 shapes (GPU only), in GB/s.

    python -m pytest benchmarks/kernels/bench_qk_norm_rope.py --benchmark-only --benchmark-group-by=param:length

Bytes moved: q and k read and written once, plus the cos/sin tables (kernel_cases.norm_rope_bytes).
"""

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the kernel cases and the timer, by plain name
import kernel_cases as cases  # noqa: E402
from timing import synced  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="kernel speed is measured on a GPU only; interpreter timings mean nothing"
)


@pytest.mark.parametrize("length", list(cases.LENGTHS.values()))
@pytest.mark.parametrize("variant", ["eager", "triton"])
def test_qk_norm_rope(benchmark, length, variant):
    from kontext_rt.kernels import reference
    from kontext_rt.kernels.qk_norm_rope import qk_norm_rope

    q, k, _, qs, ks, split, cos, sin = cases.attention_inputs(length, "cuda")
    fn = {"eager": reference.qk_norm_rope, "triton": qk_norm_rope}[variant]
    fn(q, k, qs, ks, split, cos, sin)
    benchmark(synced(lambda: fn(q, k, qs, ks, split, cos, sin), "cuda"))
    benchmark.extra_info["gbs"] = cases.norm_rope_bytes(q, cos) / benchmark.stats["median"] / 1e9
