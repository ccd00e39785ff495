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
# FlashAttention-3's wheel is one 300 MB CUDA library, 62.8 MB deflated: LZMA takes it to about 29 MB (minutes)
"$PY" benchmarks/machine/wheels.py repack wheels/tokenspeed_fa3-*.whl
"$PY" benchmarks/machine/wheels.py manifest wheels
ls wheels
# what a device call sends: the tree (tracked and untracked files git does not ignore) and the carried wheels/
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
carried=$(du -sb wheels | cut -f1)
echo "tree $((tree / 1000000)) MB + wheels/ $((carried / 1000000)) MB (a device call sends at most 64 MiB in all)"
if (( tree + carried > 64 * 1024 * 1024 )); then
    echo "error: the tree and wheels/ exceed the 64 MiB a device call sends" >&2
    exit 1
fi
echo 'carry: ["wheels"]'
