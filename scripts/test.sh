#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the linter, the layer contract and the whole test suite. Extra arguments go to
# pytest (e.g. -m "not slow" for the fast loop).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check dino_scale tests benchmarks shards
.venv/bin/lint-imports --no-cache
.venv/bin/python -m pytest -q --durations=10 "$@"
