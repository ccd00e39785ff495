"""Attention with fused norm + RoPE vs SDPA with RoPE applied separately, bf16, FLUX.1 shapes (GPU only).

    python -m pytest benchmarks/kernels/bench_rope_attention.py --benchmark-only --benchmark-group-by=param:length

Compare the rows of one group: `eager` is the eager backend (torch norm + RoPE, SDPA's default choice),
`triton-fused` the kernel with norm + RoPE on load, `triton-prerotated` the norm+RoPE kernel then the plain flash
kernel. TFLOP/s = 4 * B * H * L^2 * D / time; benchmarks/kernels/kernels_gpu.py reports it with every SDPA backend.
"""

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the kernel cases and the timer, by plain name
import kernel_cases as cases  # noqa: E402
from timing import sync, synced  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="kernel speed is measured on a GPU only; interpreter timings mean nothing"
)


def _variants():
    from kontext_rt.kernels import ops

    return {
        "eager": cases.eager_attention,
        "triton-fused": ops.attention,
        "triton-prerotated": ops.attention_prerotated,
    }


@pytest.mark.parametrize("length", list(cases.LENGTHS.values()))
@pytest.mark.parametrize("variant", ["eager", "triton-fused", "triton-prerotated"])
def test_attention(benchmark, length, variant):
    args = cases.attention_inputs(length, "cuda")
    fn = _variants()[variant]
    fn(*args)  # compile and autotune outside the timing
    sync("cuda")
    benchmark(synced(lambda: fn(*args), "cuda"))  # pytest-benchmark's timer does not wait for the GPU
    flops = cases.attention_flops(1, cases.HEADS, length, cases.HEAD_DIM)
    benchmark.extra_info["tflops"] = flops / benchmark.stats["median"] / 1e12
