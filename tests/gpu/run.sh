#!/usr/bin/env bash
# The GPU check of libra in one command: build for this GPU, run the whole test suite with the CUDA
# tests, count host syncs, benchmark the ops and the detectors against torchvision, train the
# default synthetic job; a markdown table of every figure is printed last and the figures are
# written as JSON to --out (default $OUT, else work_dirs/gpu_check). See tests/gpu/README.md.
#
#   tests/gpu/run.sh                          # CUDA machine, all steps within --budget 555 s
#   tests/gpu/run.sh --wheels DIR             # offline: pycocotools-*.whl from DIR (default tests/gpu/wheels, .whl)
#   tests/gpu/run.sh --dry                    # CPU dry run at tiny sizes (or LIBRA_GPU_DRY=1)
#   tests/gpu/run.sh --steps build,cuda_tests,sync_count --budget 300
#   tests/gpu/run.sh --help
#
# PYTHON selects the interpreter (default python3). Exit code 0 when every step that ran passed.
set -u
cd "$(dirname "$0")/../.." || exit 2
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ "${LIBRA_GPU_DRY:-0}" = "1" ]; then
    set -- --dry "$@"
fi
exec "$PYTHON" tests/gpu/gpu_check.py "$@"
