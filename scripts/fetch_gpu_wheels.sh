#!/usr/bin/env bash
# Downloads into .whl/ the wheels of the packages that the lent GPU machine's image lacks (it has torch,
# lightning, timm, torchmetrics, scikit-image, opencv, pytest; see the device tool's KINDS.md), for its
# Python 3.12, at the versions installed here. scripts/gpu_check.sh installs them there; carry .whl with it.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(segmentation-models-pytorch albumentations albucore simsimd stringzilla pydantic pydantic-core
  annotated-types typing-inspection jsonargparse docstring-parser typeshed-client)
pins=()
for name in "${packages[@]}"; do
  pins+=("$name==$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
rm -rf .whl
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${pins[@]}"
ls .whl
du -sh .whl
