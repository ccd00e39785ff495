"""benchmarks/gpu_suite.py is the one call a GPU machine gets for the speed ladder: check on the CPU (tiny model,
--smoke) that it runs through, that its exactness checks hold, and that it never writes smoke timings into
benchmarks/results. Its timings here are CPU timings of a tiny model and say nothing about GPU speed."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


def _script():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_json_and_chart(tmp_path):
    assert _script().main(["--smoke", "--out", str(tmp_path), "--steps-timed", "2", "--repeats", "1"]) == 0
    (js,) = tmp_path.glob("cpu-smoke-*.json")
    result = json.loads(js.read_text())
    # eager linears are not row-invariant, so on the CPU smoke run the check may go either way; it must be recorded
    assert result["smoke"] and isinstance(result["checks"]["hoisted_equals_per_step"], bool)
    assert result["checks"]["finite"]
    assert set(result["ladder"]) == {"eager", "hoisted", "fp8"}
    assert {"triton", "graphs", "compile"} <= set(result["skipped"])
    assert len(result["fp8_drift"]["velocity_rel_error_per_step"]) == 4
    assert 0 < result["fp8_drift"]["final_latent_rel_error"] < 1
    assert set(result["end_to_end_s"]["hoisted"]) == {"28", "8", "4"}
    png = next(tmp_path.glob("*-ladder.png")).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_step_flops_is_the_published_kontext_figure():
    from kontext_rt.config import PRESETS

    flops = _script().step_flops(PRESETS["flux-kontext-dev"], 512, 4096, 4096)
    assert abs(flops / 1e12 - 165) < 5  # the 165 TFLOP per step at 8704 tokens


def test_smoke_refuses_the_results_folder():
    with pytest.raises(SystemExit):
        _script().main(["--smoke", "--out", str(SCRIPT.parent / "results")])


def test_random_transformer_is_initialised(tmp_path):
    from kontext_rt.config import PRESETS

    model = _script().random_transformer(PRESETS["tiny"], "cpu", torch.bfloat16)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.double_blocks[0].img_attn.qkv.weight.std() > 0
