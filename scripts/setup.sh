#!/usr/bin/env bash
# Install torch, the package with its compiled extension (C++/OpenMP always, CUDA when torch has CUDA and
# nvcc is found; APP_DISABLE_CUDA=1 skips it), and the development tools.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --upgrade "pip>=23" "setuptools>=64" wheel ninja
python -m pip install torch==2.14.1 torchvision==0.29.1
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install --no-build-isolation -e ".[dev]"
python -c "import app.ops as ops; ops._extension.require_extension(); print('app._C loaded; CUDA kernels:', ops.has_cuda_kernels())"
