#!/usr/bin/env bash
# Set everything up, lint, and run the default test suite (no slow, no cuda tests).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
echo "setup (install + build) took $(( $(date +%s) - start )) s"
ruff check .
ruff format --check .
python -m pytest -q -p no:cacheprovider "$@"
echo "setup + lint + tests took $(( $(date +%s) - start )) s"
