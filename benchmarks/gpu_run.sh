#!/usr/bin/env bash
# The one command for a GPU machine (benchmarks/machine/gpu_run.py says what it runs and writes):
#   bash benchmarks/gpu_run.sh [--out DIR]               # on the GPU machine; DIR defaults to $OUT
#   bash benchmarks/gpu_run.sh --rehearse --out DIR      # the same control flow on a CPU machine (CI runs it)
# Prepare the GPU call with `bash benchmarks/gpu_wheels.sh` (carry ["wheels"]). PYTHON picks the interpreter.
# This path is the one the project's operating instructions name: it stays here, the tooling is in machine/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/machine/gpu_run.py "$@"
