"""The environment of a GPU run, as JSON on stdout: the GPU, driver and CUDA, the Python packages, and what imports
(kontext_rt and from where, diffusers, TensorRT). gpu_run.py runs it after installing the carried wheels, so it sees
exactly what the benchmarks will see. Every probe is independent: one that fails is recorded, never fatal.
"""

from __future__ import annotations

import importlib
import json
import platform
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

PACKAGES = (
    "torch",
    "triton",
    "numpy",
    "transformers",
    "huggingface_hub",
    "safetensors",
    "diffusers",
    "requests",
    "onnx",
    "onnxruntime",
    "matplotlib",
    "kontext-rt",
)
SMI_FIELDS = "name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit,pcie.link.gen.max"


def nvidia_smi() -> dict:
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi not found"}
    run = subprocess.run(
        ["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
    )
    if run.returncode:
        return {"error": run.stderr.strip()[-500:]}
    return [
        dict(zip(SMI_FIELDS.split(","), (v.strip() for v in line.split(",")), strict=False))
        for line in run.stdout.strip().splitlines()
    ]


def torch_facts() -> dict:
    import torch

    facts = {"cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts |= {
            "device": props.name,
            "capability": list(torch.cuda.get_device_capability(0)),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count,
            "cudnn": torch.backends.cudnn.version(),
        }
    return facts


def imports() -> dict:
    out = {}
    for name in ("kontext_rt", "kontext_rt.kernels.ops", "diffusers", "tensorrt", "torchao", "flash_attn_interface"):
        try:
            module = importlib.import_module(name)
            out[name] = {"ok": True, "file": getattr(module, "__file__", None)}
        except Exception as err:  # recorded: an import that fails here is a finding, not a crash
            out[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
    return out


def probe(fn):
    try:
        return fn()
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"[:500]}


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main() -> int:
    facts = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "machine": platform.machine(),
        "nvidia_smi": probe(nvidia_smi),
        "torch": probe(torch_facts),
        "packages": probe(versions),
        "imports": probe(imports),
    }
    print(json.dumps(facts))  # one line: the caller reads the last line of the output
    return 0


if __name__ == "__main__":
    sys.exit(main())
