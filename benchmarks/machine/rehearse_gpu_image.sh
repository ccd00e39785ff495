#!/usr/bin/env bash
# Rehearse the GPU run on this CPU machine under the GPU image's versions, before spending GPU time on it:
#   1. a Python 3.12 venv with the image's packages (benchmarks/machine/gpu_image.txt: torch 2.11.0 from the package
#      index, which runs CPU-only here, triton 3.6.0; no diffusers, no requests), made once and reused;
#   2. bash benchmarks/gpu_wheels.sh, as before a GPU call;
#   3. bash benchmarks/gpu_run.sh --rehearse in that venv: it installs the wheels offline into a fresh target
#      folder exactly as on the GPU machine, then runs every phase;
#   4. the kernel AOT compile (every kernel for sm_90 with triton 3.6) and the FP8 and graph tests in that venv.
#   bash benchmarks/machine/rehearse_gpu_image.sh [OUT_DIR]   # GPU_IMAGE_VENV (default .gpu-image-venv), PYTHON312
# The first run downloads torch 2.11 with its CUDA libraries (~3 GB).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${GPU_IMAGE_VENV:-.gpu-image-venv}
OUT=${1:-$(mktemp -d -t gpu-image-rehearsal-XXXX)}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON312:-python3.12}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet -r benchmarks/machine/gpu_image.txt
fi
"$VENV/bin/python" -c 'import sys, torch, triton; assert sys.version_info[:2] == (3, 12); print("venv:", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)'

PYTHON="$VENV/bin/python" bash benchmarks/gpu_wheels.sh
PYTHON="$VENV/bin/python" bash benchmarks/gpu_run.sh --rehearse --out "$OUT"
echo "rehearsal files: $OUT"

SITE=$(mktemp -d -t gpu-image-site-XXXX)
trap 'rm -rf "$SITE"' EXIT
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$SITE" wheels/*.whl
PYTHONPATH="$SITE" "$VENV/bin/python" -c 'import kontext_rt, diffusers; print("offline install imports kontext_rt", kontext_rt.__file__, "and diffusers", diffusers.__version__)'
PYTHONPATH="$SITE" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_kernel_compile.py tests/test_fp8.py \
    tests/test_graphs.py
