"""benchmarks/kernels/kernels_gpu.py is the one call a GPU machine gets: check here, on the CPU, that it runs through,
that its checks pass on the interpreter, and that its smoke mode never writes into benchmarks/results."""

import json

import pytest

from tests import bench_scripts


def _script():
    return bench_scripts.load("kernels/kernels_gpu.py")


def test_smoke_run_writes_checked_json(tmp_path):
    out = tmp_path / "smoke.json"
    assert _script().main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["all_checks_ok"] and result["timings_are_kernel_speeds"] is False
    rows = result["attention"]["one-context"]["timings"]
    assert {"triton-fused", "triton-prerotated", "sdpa-flash + torch norm+rope"} <= set(rows)
    assert rows["triton-fused"]["ms"] > 0 and "gbs" in result["qk_norm_rope"]["one-context"]["timings"]["triton"]
    assert set(result["modulation"]) == {"modulate", "gated_residual"}
    gelu = result["gelu_quant"]
    assert set(gelu) == {"A=96 M=384", "A=0 M=384"}  # the smoke width 96: a single block and a double MLP
    assert all(c["checks"]["within_error_bound"] and c["timings"]["triton"]["gbs"] > 0 for c in gelu.values())


def test_smoke_refuses_the_results_folder():
    with pytest.raises(SystemExit):
        _script().main(["--smoke", "--out", str(bench_scripts.BENCH / "results" / "x.json")])
