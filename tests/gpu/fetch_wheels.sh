#!/usr/bin/env bash
# Download the wheels the GPU check installs offline (pycocotools: evaluation, the training step's
# AP) into tests/gpu/wheels/, on a machine WITH network access, for the GPU machine's Python
# (default 3.12, x86-64 manylinux; pycocotools' abi3 wheel also serves later Pythons).
#
#   tests/gpu/fetch_wheels.sh            # Python 3.12
#   PY_VERSION=3.11 tests/gpu/fetch_wheels.sh
#
# The folder is ignored by git (tests/gpu/.gitignore): name it in the device call's carry list
# (carry: ["tests/gpu/wheels"]) so that it travels with the working tree.
set -eu
cd "$(dirname "$0")"
PY_VERSION=${PY_VERSION:-3.12}
PYCOCOTOOLS=${PYCOCOTOOLS:-pycocotools==2.0.11}
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d wheels "$PYCOCOTOOLS"
ls -l wheels
