"""Fused adaLN modulation and gated residual vs the eager torch ops, bf16, (1, 8704, 3072) (GPU only), in GB/s.

    python -m pytest benchmarks/kernels/bench_modulation.py --benchmark-only --benchmark-group-by=func

Bytes moved: modulate reads x and writes the result (2 passes of B*L*C); gated_residual reads x and y (3 passes).
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
LENGTH = cases.LENGTHS["one-context"]


def _bench(benchmark, fn, args, passes):
    fn(*args)
    benchmark(synced(lambda: fn(*args), "cuda"))
    benchmark.extra_info["gbs"] = passes * args[0].numel() * args[0].element_size() / benchmark.stats["median"] / 1e9


@pytest.mark.parametrize("variant", ["eager", "triton"])
def test_modulate(benchmark, variant):
    from kontext_rt.kernels import modulation, reference

    x, _, shift, scale, _ = cases.rows_inputs(LENGTH, "cuda")
    _bench(benchmark, {"eager": reference.modulate, "triton": modulation.modulate}[variant], (x, shift, scale), 2)


@pytest.mark.parametrize("variant", ["eager", "triton"])
def test_gated_residual(benchmark, variant):
    from kontext_rt.kernels import modulation, reference

    x, y, _, _, gate = cases.rows_inputs(LENGTH, "cuda")
    fn = {"eager": reference.gated_residual, "triton": modulation.gated_residual}[variant]
    _bench(benchmark, fn, (x, gate, y), 3)
