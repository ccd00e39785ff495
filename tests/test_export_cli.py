"""`kontext-rt export` end to end on the tiny checkpoint: stages, manifests, resuming, and the refusals."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnx")
pytest.importorskip("modelopt.torch.quantization")

from kontext_rt.cli import main  # noqa: E402
from kontext_rt.export.trt_ops import unsupported_ops  # noqa: E402
from kontext_rt.weights.formats import detect  # noqa: E402

GRAPHS = ("transformer", "vae_encoder", "vae_decoder")


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def test_onnx_only_export_writes_graphs_and_manifests_then_resumes(kontext_dir, tmp_path, capsys):
    out = tmp_path / "engines"
    args = [
        "export",
        "--checkpoint",
        str(kontext_dir),
        "--out",
        str(out),
        "--precision",
        "fp16",
        "--onnx-only",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "[1/3] onnx vae_encoder: done" in err and "[3/3] onnx transformer: done" in err
    folder = out / "onnx-fp16"
    for graph in GRAPHS:
        manifest = json.loads((folder / f"{graph}.json").read_text())
        assert manifest["checkpoint"] == detect(kontext_dir).fingerprint()
        assert manifest["precision"] == "fp16" and manifest["stage"] == "onnx"
        assert manifest["files"][f"{graph}.onnx"] == (folder / f"{graph}.onnx").stat().st_size
        assert [p["name"] for p in manifest["io"]["profiles"]]
        assert unsupported_ops(folder / f"{graph}.onnx") == {}
    assert main(args) == 0
    assert capsys.readouterr().err.count("up to date, reused") == 3


def test_a_damaged_artifact_is_redone(kontext_dir, tmp_path, capsys):
    out = tmp_path / "engines"
    args = [
        "export",
        "--checkpoint",
        str(kontext_dir),
        "--out",
        str(out),
        "--precision",
        "bf16",
        "--onnx-only",
        "--device",
        "cpu",
        "-q",
    ]
    assert main(args) == 0
    graph = out / "onnx-bf16" / "vae_decoder.onnx"
    graph.write_bytes(graph.read_bytes()[:100])  # truncated
    assert main([a for a in args if a != "-q"]) == 0
    err = capsys.readouterr().err
    assert "onnx vae_decoder: done" in err and err.count("up to date, reused") == 2


def test_fp8_onnx_only_calibrates_then_reuses_the_calibration(kontext_dir, tmp_path, capsys):
    out = tmp_path / "engines"
    args = [
        "export",
        "--checkpoint",
        str(kontext_dir),
        "--out",
        str(out),
        "--precision",
        "fp8",
        "--onnx-only",
        "--device",
        "cpu",
        "--calibration-steps",
        "1",
        "--calibration-size",
        "32",
        "--calibration-no-auto-resize",
    ]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("make it red\n\nadd a hat\n")
    assert main([*args, "--calibration-prompts", str(prompts)]) == 0
    err = capsys.readouterr().err
    assert "calibration 2/2" in err and "[3/4] calibration fp8: done" in err
    assert (out / "calibration" / "fp8.safetensors").is_file()
    ops = [n.op_type for n in __import__("onnx").load(str(out / "onnx-fp8" / "transformer.onnx")).graph.node]
    assert "TRT_FP8QuantizeLinear" in ops
    (out / "onnx-fp8" / "transformer.json").unlink()  # the graph is redone from the saved calibration
    assert main([*args, "--calibration-prompts", str(prompts)]) == 0
    err = capsys.readouterr().err
    assert "calibration fp8: up to date, reused" in err and "onnx transformer: done" in err
    prompts.write_text("make it blue\n")  # other calibration data: calibration and the FP8 graph are redone
    assert main([*args, "--calibration-prompts", str(prompts)]) == 0
    err = capsys.readouterr().err
    assert "calibration fp8: done" in err and "onnx transformer: done" in err and err.count("reused") == 2


@pytest.mark.skipif(_tensorrt_importable(), reason="TensorRT is importable here: the refusal does not apply")
def test_engines_without_tensorrt_fail_before_any_work(kontext_dir, tmp_path, capsys):
    out = tmp_path / "engines"
    rc = main(["export", "--checkpoint", str(kontext_dir), "--out", str(out), "--precision", "fp16", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: TensorRT is not importable") and "--onnx-only" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--precision", "fp4"], "invalid choice"),
        (["--precision", "fp8", "--calibration-images", "nope.png"], "calibration image nope.png: no such file"),
    ],
)
def test_bad_export_arguments(kontext_dir, tmp_path, capsys, args, match):
    base = ["export", "--checkpoint", str(kontext_dir), "--out", str(tmp_path / "o"), "--onnx-only"]
    if "--precision" not in args:
        base += ["--precision", "fp16"]
    assert main(base + args) == 2
    assert match in capsys.readouterr().err


def test_edit_with_engines_on_a_machine_without_gpu_says_why(kontext_dir, tmp_path, capsys):
    img = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(img)
    rc = main(
        [
            "edit",
            str(img),
            "x",
            "--checkpoint",
            str(kontext_dir),
            "--engines",
            str(tmp_path),
            "--device",
            "cpu",
            "-o",
            str(tmp_path / "out.png"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "backend 'tensorrt' needs a CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


def test_export_takes_the_precision_as_a_string_and_refuses_others(kontext_dir, tmp_path):
    from kontext_rt.backends.manifest import Precision
    from kontext_rt.errors import InputError
    from kontext_rt.export.stages import Export, ExportOptions

    export = Export(ExportOptions(kontext_dir, tmp_path, "fp8"))
    assert export.precision is Precision.FP8 and ("calibration", "fp8") in export.stages()
    with pytest.raises(InputError, match="precision must be one of fp16, bf16, fp8, got 'fp32'"):
        Export(ExportOptions(kontext_dir, tmp_path, "fp32"))
