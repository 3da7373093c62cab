#!/usr/bin/env bash
# The demo's second half, on a finished run: export the trained teacher to ONNX, index the sample training images,
# search with a mildly edited copy of one of them (its original comes back first), and run the k-NN evaluation.
# Usage: bash scripts/demo_retrieval.sh RUN_DIR   (PYTHON overrides the interpreter, default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir="$1"
py="${PYTHON:-.venv/bin/python}"
work="$run_dir/retrieval"
dino() { "$py" -m dino_scale "$@"; }

# The export runs at the size the model was trained at (64 px here), and says so.
dino export --format onnx --checkpoint "$run_dir" --outputs cls,patch_gem --out "$work/demo.onnx"
dino index --shards shards/sample/train --model "$work/demo.onnx" --out "$work/index" --descriptor cls+gem
"$py" - "$work/query.jpg" <<'PY'
import io, random, sys, tarfile
from PIL import Image
from dino_scale.data.copies import mild_copy
with tarfile.open("shards/sample/train/train-000002.tar") as tar:
    member = next(m for m in tar if m.name.endswith(".jpg"))
    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
mild_copy(image, random.Random(0)).save(sys.argv[1], quality=85)
print(f"query: a mild copy (crop, resize, JPEG, brightness) of train-000002.tar#{member.name.split('.')[0]}")
PY
dino search --index "$work/index" --query "$work/query.jpg" -k 5
dino eval knn --model "$work/demo.onnx" --train shards/sample/train --test shards/sample/val -k 10,20,100,200 \
  --json "$work/knn_eval.json"
echo "retrieval demo: $work (demo.onnx + sidecar, index/, query.jpg, knn_eval.json)"
