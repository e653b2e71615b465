#!/usr/bin/env bash
# The Megatron GPU check in a GPU environment of its own (e.g. Python 3.12 and that machine's CUDA torch),
# with no downloads there: installs the carried megatron-core wheel and this package into a scratch
# folder, then runs tests/gpu/megatron_gpu_check.py on GPU 0 and prints its JSON line.
#
# Prepare the wheel where a package registry is reachable (2.4 MB; .gpu_wheels/ is git-ignored and
# travels with the working tree, e.g. `run(carry=[".gpu_wheels"])`):
#   python -m pip download megatron-core==0.19.2 --no-deps --only-binary :all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .gpu_wheels
# The GPU environment must already have torch (CUDA, with triton), numpy, packaging, tqdm and setuptools
# (NGC PyTorch images do). Exit status: 0 all checks passed, 1 a check failed, 2 no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=${ARCHOPT_GPU_WHEELS:-.gpu_wheels}
PY=${PYTHON:-python3}
TARGET=$(mktemp -d)
trap 'rm -rf "$TARGET"' EXIT
"$PY" -m pip install --quiet --no-deps --no-index --find-links "$WHEELS" --target "$TARGET" megatron-core==0.19.2
"$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index --target "$TARGET" .
PYTHONPATH="$TARGET" "$PY" tests/gpu/megatron_gpu_check.py
