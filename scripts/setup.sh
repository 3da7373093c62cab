#!/usr/bin/env bash
# Create .venv (once) and install dino-scale with its dev tools into it. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
quiet_pip() {
  # pip's per-package notes about local index folders are noise here; its errors and exit status pass through.
  .venv/bin/pip install --quiet --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}
# The torch pair is pinned so that a fresh machine installs the same build that the tests were run with.
quiet_pip "torch==2.14.1" "torchvision==0.29.1"
quiet_pip -e ".[dev]"
