"""benchmarks/export_throughput.py: export a random backbone, bench it, write every runtime's numbers."""

from __future__ import annotations

import json
from pathlib import Path

from support import load_benchmark


def test_export_throughput_reports_eager_and_onnxruntime(tmp_path: Path) -> None:
    script = load_benchmark("export_throughput")
    tiny = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
    out = tmp_path / "results.json"
    script.main([
        "--arch", "vit_tiny_patch16_224", "--timm-kwargs", json.dumps(tiny), "--image-size", "32",
        "--batch", "1", "--batch", "3", "--runtimes", "pytorch-eager,onnxruntime:CPU",
        "--warmup", "1", "--iterations", "2", "--json", str(out), "--workdir", str(tmp_path / "work"),
    ])  # fmt: skip
    results = json.loads(out.read_text())
    assert [r["batch"] for r in results] == [1, 3]
    for result in results:
        assert result["arch"] == "vit_tiny_patch16_224" and result["image_size"] == 32
        rows = {row["runtime"]: row for row in result["results"]}
        assert set(rows) == {"pytorch-eager", "onnxruntime:CPU"}
        assert all(row["images_per_s"] > 0 for row in rows.values()), rows
    sidecar = json.loads((tmp_path / "work" / "model.onnx.json").read_text())
    assert sidecar["parity"]["max_relative_error"] <= 1e-4
