#!/usr/bin/env bash
# Set up (scripts/setup.sh), then train a tiny ViT with DINO on the sample shards on this machine and print the
# trained teacher's k-NN accuracy on the held-out split next to a randomly initialised network's; then export it
# to ONNX, index the sample images, search with a query image and run `dino-scale eval knn` (scripts/demo_retrieval.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
run_dir="runs/demo-$(date +%Y%m%d-%H%M%S)"
.venv/bin/python -m dino_scale.train --config configs/demo.json --output-dir "$run_dir" "$@"
echo "run directory: $run_dir (metrics.jsonl, checkpoints/, teacher_backbone.safetensors, knn.json)"
bash scripts/demo_retrieval.sh "$run_dir"
