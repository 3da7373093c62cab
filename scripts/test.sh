#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite plus the linter. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check dino_scale tests benchmarks shards
.venv/bin/python -m pytest -q --durations=10 "$@"
