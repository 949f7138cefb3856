#!/usr/bin/env bash
# Download the wheels of the loss benchmark's peers, Cut Cross-Entropy and Liger-Kernel, into
# benchmarks/wheels/ (git-ignored), for a GPU machine without network access: gpu_suite.sh installs them from
# there with `pip install --no-deps --no-index`. Run it where a package index is reachable, then copy the
# folder along with the checkout (it is ignored by git, so a copy of the tracked files alone leaves it behind).
#
# Only the two packages, no dependencies: both need just torch and triton, which the GPU machine has (Liger
# also imports `packaging`). Both ship pure-Python wheels (py3-none-any); the Python version and platform
# below only matter should one of them ship compiled wheels. Liger-Kernel >= 0.8.2: earlier releases give
# wrong gradients for per-token weighted losses (reduction="none"), which the benchmark needs.
#
# Usage: bash benchmarks/fetch_wheels.sh
#   PYTHON=python3        the interpreter whose pip downloads
#   WHEEL_PYTHON=3.12     the GPU machine's Python version
#   WHEEL_PLATFORM=manylinux2014_x86_64
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST=benchmarks/wheels
mkdir -p "$DEST"
"$PY" -m pip download --no-deps --only-binary=:all: --dest "$DEST" \
    --python-version "${WHEEL_PYTHON:-3.12}" --platform "${WHEEL_PLATFORM:-manylinux2014_x86_64}" \
    "cut-cross-entropy" "liger-kernel>=0.8.2"
ls -l "$DEST"/*.whl
