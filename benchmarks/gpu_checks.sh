#!/usr/bin/env bash
# The GPU checks of the training step and the data path, as one script for a machine with one CUDA GPU (the device
# tool's H200: 16 cores). Run from the repository root after `bash scripts/setup.sh`; everything it measures lands in
# $OUT (default gpu-checks/), to be copied into benchmarks/RESULTS.md with the date and this command line.
#   1. the training step's host syncs on CUDA (torch's sync debug mode + HostReadCounter), compile graphs, SDPA;
#   2. the device decode / render path against the workers on real batches (pixel agreement on the GPU);
#   3. benchmarks/train_throughput.py: data path and end-to-end img/s of (a) workers, (b) device path, (c) the
#      official-style loop for ViT-S/16 at 224 / 96 px, then (a) / (b) with torch.compile.
set -euo pipefail
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"

OMP_NUM_THREADS=4 timeout 900 "$PY" -m pytest -q -p no:cacheprovider \
    tests/integration/test_training_step.py tests/unit/data/test_device_augment.py tests/unit/data/test_device_path.py \
    tests/unit/data/test_device_decode.py 2>&1 | tail -n 30 | tee "$OUT/pytest.txt"

"$PY" benchmarks/train_throughput.py --device cuda --setups vits16 --batch 64 --steps 60 --warmup 20 --threads 4 \
    --workers 10 --images 2048 --json "$OUT/train-throughput-vits16-gpu.json" 2>&1 | tail -n 20 | tee "$OUT/vits16.txt"
"$PY" benchmarks/train_throughput.py --device cuda --setups vits16 --batch 64 --steps 60 --warmup 20 --threads 4 \
    --workers 10 --images 2048 --only train --set model.compile=true \
    --json "$OUT/train-throughput-vits16-gpu-compiled.json" 2>&1 | tail -n 12 | tee "$OUT/vits16-compiled.txt"
