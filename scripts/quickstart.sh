#!/usr/bin/env bash
# Set everything up and run the main job: the quickstart experiment, the U-Net with the TRWP head on the
# synthetic shapes (CPU, a few minutes). configs/quickstart.yaml alone is the same U-Net without a head.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
lightning fit --config configs/trwp_shapes.yaml "$@"
