#!/usr/bin/env bash
# Fill wheels/ for the GPU machine's offline install (benchmarks/machine/gpu_wheels.sh says how), then print the
# device call's carry list:
#   bash benchmarks/gpu_wheels.sh        # then: bash benchmarks/gpu_run.sh on the GPU, carrying ["wheels"]
# This path is the one the project's operating instructions name: it stays here, the tooling is in machine/.
set -euo pipefail
exec bash "$(dirname "$0")/machine/gpu_wheels.sh" "$@"
