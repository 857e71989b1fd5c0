#!/usr/bin/env bash
# Set everything up and run the main job: the quickstart experiment (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
lightning fit --config configs/quickstart.yaml "$@"
