#!/usr/bin/env bash
# The GPU checks in one call, on a machine with a CUDA GPU whose image already has torch, lightning, timm,
# torchmetrics and pytest (the lent H100/H200; README "GPU checks"): installs the wheels that
# scripts/fetch_gpu_wheels.sh put in .whl/ (if any), builds the extension with its CUDA kernels for this GPU,
# runs the cuda-marked tests, then the GPU benchmarks (message passing, ConvCRF, logit consistency). Logs and
# the benchmarks' JSON (results.tar) go to $OUT (default gpu_check/; 5 files); the exit status is the tests'.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu_check}"
mkdir -p "$out"
python=python3
if compgen -G ".whl/*.whl" > /dev/null; then
  $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
arch="$($python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')" || exit 1
start=$SECONDS
if ! TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  $python setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  exit 1
fi
echo "extension built for sm_${arch/./} in $((SECONDS - start)) s"
$python -c "import app.ops as ops; assert ops.has_cuda_kernels(), 'no CUDA kernels in app._C'" || exit 1
timeout 240 $python -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tee "$out/tests.log"
status=${PIPESTATUS[0]}
# the reference (a Python loop of small launches) only where the thesis tables compare: TRWP-4 / ISGMR-4, 32 labels
for bench in "message_passing_speed.py --device cuda --labels 32 96 --reference-directions --profile" \
  "message_passing_speed.py --device cuda --labels 32 --methods trwp isgmr --directions 4 --repeats 1" \
  "message_passing_speed.py --device cuda --batch 8 --size 96 96 --labels 4 21 --methods trwp isgmr meanfield \
    --directions 4 8 --reference-directions" \
  "message_passing_speed.py --device cuda --labels 32 96 --methods trwp isgmr --directions 4 \
    --reference-directions --cuda-block-sweeps" \
  "message_passing_speed.py --device cuda --labels 32 96 --methods trwp isgmr --directions 4 \
    --pairwise truncated_linear --reference-directions" \
  "convcrf.py --device cuda --images 8" "segment_mean.py --device cuda"; do
  echo "== benchmarks/$bench"
  # shellcheck disable=SC2086
  timeout 120 $python benchmarks/$bench 2>&1
  # after every benchmark, so that a call stopped at its time limit still returns what finished
  (cd benchmarks/results && tar cf "$out/results.tar" --ignore-failed-read message_passing_speed_cuda_*.json \
    convcrf_cuda.json segment_mean_cuda.json 2>/dev/null)
done | tee "$out/benchmarks.log"
exit "$status"
