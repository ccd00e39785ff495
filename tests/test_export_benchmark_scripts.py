"""The export benchmark scripts run (on the CPU: the memory script on a tiny model, the TensorRT script records
that TensorRT or the GPU is missing); their real runs write benchmarks/results/."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests import bench_scripts


def test_export_memory_script_measures_peak_rss(tmp_path):
    pytest.importorskip("onnxscript")
    out = tmp_path / "mem.json"
    run = subprocess.run(
        [
            sys.executable,
            str(bench_scripts.path("e2e/export_memory.py")),
            "--smoke",
            "--out",
            str(out),
            "--cases",
            "fp16-dynamo",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["peak_rss_mib"] >= result["after_load_rss_mib"] >= result["baseline_rss_mib"] > 0
    assert result["weights_mib"] > 0 and result["onnx_mib"] > 0


def test_tensorrt_script_records_what_it_found(tmp_path):
    out = tmp_path / "trt.json"
    run = subprocess.run(
        [sys.executable, str(bench_scripts.path("gpu/tensorrt_gpu.py")), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads(out.read_text())
    assert isinstance(record["tensorrt"]["importable"], bool)
    if not record["tensorrt"]["importable"]:
        assert record["tensorrt"]["error"]
    if not (record["tensorrt"]["importable"] and record["cuda"]):
        assert record["skipped"] and "ms_per_step" not in record
