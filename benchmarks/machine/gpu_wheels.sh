#!/usr/bin/env bash
# Fill wheels/ (git-ignored) with what the GPU machines' image lacks, for an offline install there: the pinned
# packages of benchmarks/machine/gpu_wheels.txt as CPython 3.12 manylinux x86_64 wheels, the project's own wheel built
# here without build isolation, and wheels/manifest.json. Then it prints the device call's carry list.
#   bash benchmarks/gpu_wheels.sh        # then: bash benchmarks/gpu_run.sh on the GPU, carrying ["wheels"]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
rm -rf wheels
mkdir wheels
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d wheels -r benchmarks/machine/gpu_wheels.txt
# no build isolation: the GPU machines cannot fetch setuptools, and here it is already installed; a fresh build/
# (setuptools would copy files left in build/lib into the wheel, which the source digest would not see)
rm -rf build
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w wheels .
"$PY" benchmarks/machine/wheels.py manifest wheels
ls wheels
echo "wheels/: $(du -sh wheels | cut -f1) (the device call carries at most 64 MiB in all)"
echo 'carry: ["wheels"]'
