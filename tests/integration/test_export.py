"""`dino-scale export` and `dino-scale bench` on briefly trained tiny models, checked against PyTorch on the CPU."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from click.testing import CliRunner
from support import ARCH, SIZE, STUDENT_SHIFT, TINY, brief_run, export, export_vit, official_checkpoint

from dino_scale import run_dir as layout
from dino_scale.cli import main as cli
from dino_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dino_scale.export import exporter as export_module
from dino_scale.io import atomic_torch_save, file_sha256, load_checkpoint, load_safetensors, safetensors_metadata
from dino_scale.models.weights import load_source


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return brief_run(
        tmp_path_factory.mktemp("resnet"),
        "resnet50.json",
        'device="cpu"',
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        "data.global_crop_size=32",
        "data.local_crops_number=0",
        "model.out_dim=64",
        "model.hidden_dim=32",
        "model.bottleneck_dim=16",
        "deepspeed.train_micro_batch_size_per_gpu=4",
        "deepspeed.train_batch_size=4",
        "deepspeed.torch_autocast.enabled=false",
    )


def teacher_backbone(run_dir: Path) -> torch.nn.Module:
    """The trained teacher as plain timm, built independently of dino_scale.inference."""
    meta = safetensors_metadata(run_dir / "teacher_backbone.safetensors")
    kwargs = json.loads(meta["timm_kwargs"])
    if meta["arch"].startswith("vit_"):
        kwargs = {**kwargs, "global_pool": "token"}
    model = timm.create_model(meta["arch"], pretrained=False, num_classes=0, **kwargs)
    model.load_state_dict(load_safetensors(run_dir / "teacher_backbone.safetensors"))
    return model.eval()


def onnx_outputs(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"images": images}), strict=True))


def normalise(images_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images_uint8_nhwc.permute(0, 3, 1, 2).float() / 255 - mean) / std


def relative_error(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.detach().numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_only(directory: Path, *names: str) -> None:
    """Nothing half-written: exactly these files (no temporaries) in the export folder."""
    present = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
    assert present == sorted(names), present


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outputs", ["cls", "cls,patch_gem", "attn"])
def test_vit_exports_each_output_set_and_matches_timm(vit_run: Path, tmp_path: Path, outputs: str) -> None:
    backbone = teacher_backbone(vit_run)
    float_onnx, uint8_onnx = tmp_path / "float.onnx", tmp_path / "bytes.onnx"
    common = ["--checkpoint", str(vit_run), "--image-size", str(SIZE), "--outputs", outputs]
    for out, extra in ((float_onnx, []), (uint8_onnx, ["--uint8"])):
        result = export(*common, *extra, "--out", str(out))
        assert result.exit_code == 0, result.output
        assert "ok" in result.output and "FAIL" not in result.output
    onnx.checker.check_model(str(float_onnx), full_check=True)
    names = outputs.split(",")

    for batch in (1, 7):
        pixels = torch.randint(0, 256, (batch, SIZE, SIZE, 3), dtype=torch.uint8)
        floats = normalise(pixels)
        got = onnx_outputs(float_onnx, floats.numpy())
        from_bytes = onnx_outputs(uint8_onnx, pixels.numpy())
        assert list(got) == names
        with torch.no_grad():
            tokens = backbone.forward_features(floats)
        expected = {"cls": tokens[:, 0], "patch_gem": tokens[:, 1:].clamp(min=1e-6).pow(4).mean(1).pow(0.25)}
        if "attn" in names:
            expected["attn"] = timm_cls_attention(backbone, floats)
        for name in names:
            assert got[name].shape == tuple(expected[name].shape), name
            assert relative_error(got[name], expected[name]) <= 1e-4, name
            # uint8 NHWC in, normalised in the graph: the same numbers as normalising outside.
            assert relative_error(from_bytes[name], expected[name]) <= 1e-4, name
    if "attn" in names:
        maps = got["attn"]
        assert maps.shape == (7, 3, SIZE // 8, SIZE // 8)
        mass = maps.reshape(7, 3, -1).sum(-1)  # softmax over CLS + patches: the patch part is below 1
        assert np.all(mass > 0) and np.all(mass < 1)


def timm_cls_attention(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's CLS attention over patches from timm's own (unfused) attention probabilities."""
    from timm.utils import AttentionExtract

    timm.layers.set_fused_attn(False)
    try:
        unfused = timm.create_model(ARCH, pretrained=False, num_classes=0, global_pool="token", **TINY).eval()
        unfused.load_state_dict(backbone.state_dict())
        last = f"blocks.{len(unfused.blocks) - 1}.attn.softmax"
        probabilities = AttentionExtract(unfused, names=[last])(images)[last]
    finally:
        timm.layers.set_fused_attn(True)
    batch, heads = probabilities.shape[:2]
    return probabilities[:, :, 0, 1:].reshape(batch, heads, SIZE // 8, SIZE // 8)


def test_resnet50_exports_cls_and_gem_and_refuses_attention(resnet_run: Path, tmp_path: Path) -> None:
    backbone = teacher_backbone(resnet_run)
    out = tmp_path / "resnet.onnx"
    result = export(
        "--checkpoint",
        str(resnet_run),
        "--image-size",
        "64",
        "--outputs",
        "cls,patch_gem",
        "--uint8",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    for batch in (1, 7):
        pixels = torch.randint(0, 256, (batch, 64, 64, 3), dtype=torch.uint8)
        got = onnx_outputs(out, pixels.numpy())
        with torch.no_grad():
            feature_map = backbone.forward_features(normalise(pixels))
        assert relative_error(got["cls"], feature_map.mean((2, 3))) <= 1e-4
        gem = feature_map.clamp(min=1e-6).pow(4).mean((2, 3)).pow(0.25)
        assert relative_error(got["patch_gem"], gem) <= 1e-4
    float_out = tmp_path / "resnet-float.onnx"
    result = export("--checkpoint", str(resnet_run), "--image-size", "64", "--out", str(float_out))
    assert result.exit_code == 0, result.output
    images = torch.randn(7, 3, 64, 64)
    with torch.no_grad():
        want = backbone(images)
    assert list(onnx_outputs(float_out, images.numpy())) == ["cls"]
    assert relative_error(onnx_outputs(float_out, images.numpy())["cls"], want) <= 1e-4

    refused = tmp_path / "refused"
    result = export("--checkpoint", str(resnet_run), "--outputs", "attn", "--out", str(refused / "r.onnx"))
    assert result.exit_code != 0
    assert "attn needs a vision transformer" in result.output
    assert_only(refused)


def test_sidecar_describes_the_artifact(vit_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "vit.onnx"
    result = export_vit(
        vit_run,
        "--outputs",
        "cls,patch_gem,attn",
        "--uint8",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert_only(tmp_path, "vit.onnx", "vit.onnx.json")
    meta = json.loads((tmp_path / "vit.onnx.json").read_text())
    graph = onnx.load(str(out)).graph
    assert meta["format"] == "onnx"
    assert meta["artifact"]["sha256"] == file_sha256(out)
    assert meta["model"] == {
        "arch": ARCH,
        "timm_kwargs": {**TINY, "img_size": SIZE},
        "patch_size": 8,
        "image_size": SIZE,
        "num_features": 48,
        "precision": "fp32",
    }
    assert meta["preprocessing"]["mean"] == list(IMAGENET_MEAN) and meta["preprocessing"]["std"] == list(IMAGENET_STD)
    assert meta["inputs"] == [{"name": "images", "dtype": "uint8", "layout": "NHWC", "shape": ["batch", 32, 32, 3]}]
    assert [i.name for i in graph.input] == ["images"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o["name"] for o in meta["outputs"]] == [o.name for o in graph.output] == ["cls", "patch_gem", "attn"]
    assert [o["shape"] for o in meta["outputs"]] == [["batch", 48], ["batch", 48], ["batch", 3, 4, 4]]
    # The batch axis is symbolic in the graph; the image axes are fixed.
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]
    checkpoint_file = layout.find_latest_checkpoint(vit_run)
    assert meta["source"]["path"] == str(checkpoint_file)
    assert meta["source"]["sha256"] == file_sha256(checkpoint_file)
    assert meta["source"]["which"] == "teacher" and meta["source"]["run"] == "tiny-test"
    assert {"torch", "timm", "onnx", "onnxruntime", "python"} <= set(meta["versions"])
    assert meta["parity"]["max_relative_error"] <= 1e-4
    assert {check["batch"] for check in meta["parity"]["checks"]} == {1, 7, 8}  # random b1/b7, 8 sample images


def test_official_checkpoint_exports_teacher_or_student(tmp_path: Path) -> None:
    weights = official_checkpoint(tmp_path / "checkpoint.pth")
    reference = timm.create_model(ARCH, pretrained=False, num_classes=0, global_pool="token", **TINY).eval()
    outputs = {}
    for which in ("teacher", "student"):
        out = tmp_path / f"{which}.onnx"
        result = export(
            "--checkpoint",
            str(tmp_path / "checkpoint.pth"),
            "--arch",
            ARCH,
            "--timm-kwargs",
            json.dumps(TINY),
            "--image-size",
            str(SIZE),
            "--which",
            which,
            "--out",
            str(out),
        )
        assert result.exit_code == 0, result.output
        outputs[which] = out
    images = torch.randn(7, 3, SIZE, SIZE)
    for which, shift in (("teacher", 0.0), ("student", STUDENT_SHIFT)):
        reference.load_state_dict({k: v + shift for k, v in weights.items()})
        with torch.no_grad():
            want = reference(images)
        assert relative_error(onnx_outputs(outputs[which], images.numpy())["cls"], want) <= 1e-4


def test_fp16_export_passes_the_cosine_gate(vit_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "half.onnx"
    result = export_vit(
        vit_run,
        "--outputs",
        "cls,patch_gem",
        "--fp16",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["model"]["precision"] == "fp16" and meta["parity"]["rule"] == "min_cosine"
    assert meta["parity"]["min_cosine"] >= 0.999
    fp16_weights = [t for t in onnx.load(str(out)).graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_weights, "an fp16 export must store half-precision weights"


def test_a_wrong_graph_is_refused_and_removed(vit_run: Path, tmp_path: Path, monkeypatch) -> None:
    real_export = export_module.export_onnx

    def export_with_a_bug(model, path, image_size, opset=None):
        with torch.no_grad():
            bias = model.backbone.blocks[-1].mlp.fc2.bias  # a small error, as from a wrong weight mapping
            bias.add_(torch.linspace(-1e-2, 1e-2, len(bias)))  # (not constant: the final LayerNorm removes that)
        return real_export(model, path, image_size, opset)

    monkeypatch.setattr(export_module, "export_onnx", export_with_a_bug)
    out_dir = tmp_path / "export"
    result = export_vit(vit_run, "--out", str(out_dir / "bad.onnx"))
    assert result.exit_code != 0
    assert "failed the parity gate" in result.output and "FAIL" in result.output and "rel err" in result.output
    assert_only(out_dir)


def test_short_form_exports_the_newest_run(vit_run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(vit_run, tmp_path / "runs" / "newest")
    result = CliRunner().invoke(cli, ["export", "--format", "onnx", "--image-size", str(SIZE)])
    assert result.exit_code == 0, result.output
    assert "most recent run" in result.output
    assert_only(tmp_path / "export", "newest.onnx", "newest.onnx.json")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--timm-kwargs", json.dumps({**TINY, "embed_dim": 96})], "does not match the model"),
        (["--arch", "resnet18"], "does not match the model"),
        (["--image-size", "30"], "not divisible by the patch size 8"),
        (["--outputs", "cls,mask"], "unknown output"),
        (["--outputs", ""], "--outputs is empty"),
        (["--bf16"], "bf16"),
        (["--min-batch", "8", "--max-batch", "4"], "--min-batch"),
        (["--parity-shards", "/nonexistent/val-{000..001}.tar"], "--parity-shards"),
    ],
)
def test_bad_input_is_named_and_nothing_is_written(vit_run: Path, tmp_path: Path, args, message) -> None:
    result = export_vit(vit_run, *args, "--out", str(tmp_path / "x.onnx"))
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert_only(tmp_path)


def test_missing_sources_are_named(tmp_path: Path, monkeypatch) -> None:
    result = export("--checkpoint", str(tmp_path / "nope.pt"))
    assert result.exit_code != 0 and "does not exist" in result.output
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["export"])
    assert result.exit_code != 0 and "no training run found under runs/" in result.output
    assert_only(tmp_path)


def test_tensorrt_without_tensorrt_names_what_is_missing(vit_run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    result = export(
        "--checkpoint",
        str(vit_run),
        "--format",
        "tensorrt",
        "--image-size",
        str(SIZE),
        "--out",
        str(tmp_path / "x.engine"),
    )
    assert result.exit_code != 0
    assert "tensorrt" in result.output
    assert_only(tmp_path)


def test_aoti_package_and_bench_every_runtime(vit_run: Path, tmp_path: Path) -> None:
    common = ["--checkpoint", str(vit_run), "--image-size", str(SIZE), "--outputs", "cls,patch_gem"]
    for suffix, fmt in ((".onnx", "onnx"), (".pt2", "aoti")):
        result = export(*common, "--format", fmt, "--max-batch", "16", "--out", str(tmp_path / f"m{suffix}"))
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.pt2.json").read_text())["format"] == "aoti"
    assert json.loads((tmp_path / "m.onnx.json").read_text())["format"] == "onnx"
    report = tmp_path / "bench.json"
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "--model",
            str(tmp_path / "m.onnx"),
            "--batch",
            "4",
            "--warmup",
            "1",
            "--iterations",
            "3",
            "--json",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "compiling a temporary AOTInductor package" not in result.output  # it ran the sibling m.pt2
    result = CliRunner().invoke(cli, ["bench", "--model", str(tmp_path / "m.onnx"), "--runtimes", "tensorrt"])
    assert result.exit_code != 0 and "not available on cpu" in result.output
    (tmp_path / "lonely.onnx").write_bytes((tmp_path / "m.onnx").read_bytes())
    result = CliRunner().invoke(cli, ["bench", "--model", str(tmp_path / "lonely.onnx")])
    assert result.exit_code != 0 and "has no sidecar lonely.onnx.json" in result.output
    rows = {row["runtime"]: row for row in json.loads(report.read_text())["results"]}
    assert set(rows) == {"pytorch-eager", "torch.compile", "onnxruntime:CPU", "aoti"}
    for name, row in rows.items():
        assert row["images_per_s"] and row["images_per_s"] > 0, (name, row)
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]


def test_sources_record_their_architecture(vit_run: Path, tmp_path: Path) -> None:
    official_checkpoint(tmp_path / "checkpoint.pth")
    assert load_source(tmp_path / "checkpoint.pth").arch == "vit_tiny_patch8_224"  # from args.arch + patch_size
    run = load_source(vit_run)
    assert (run.arch, run.timm_kwargs, run.run_name) == (ARCH, TINY, "tiny-test")
    assert run.path == layout.find_latest_checkpoint(vit_run)
    safetensors_source = load_source(vit_run / "teacher_backbone.safetensors")
    assert (safetensors_source.arch, safetensors_source.timm_kwargs) == (ARCH, TINY)
    assert torch.equal(safetensors_source.weights["pos_embed"], run.weights["pos_embed"])


def test_folder_checkpoint_of_a_sharded_backend_exports_its_teacher(vit_run: Path, tmp_path: Path) -> None:
    """DeepSpeed / FSDP runs keep the teacher in checkpoints/step_N/trainer_state.pt."""
    run = tmp_path / "runs" / "sharded"
    folder = run / "checkpoints" / "step_00000004"
    folder.mkdir(parents=True)
    shutil.copy(vit_run / "config.json", run / "config.json")
    state = load_checkpoint(layout.find_latest_checkpoint(vit_run))
    atomic_torch_save(
        {k: v for k, v in state.items() if k not in ("student", "optimizer")}, folder / "trainer_state.pt"
    )
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 4, "file": "step_00000004"}))
    out = tmp_path / "sharded.onnx"
    result = export("--checkpoint", str(run), "--image-size", str(SIZE), "--out", str(out))
    assert result.exit_code == 0, result.output
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["source"]["path"] == str(folder / "trainer_state.pt") and meta["source"]["run"] == "sharded"
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want = teacher_backbone(vit_run)(images)
    assert relative_error(onnx_outputs(out, images.numpy())["cls"], want) <= 1e-4
    result = export(
        "--checkpoint",
        str(run),
        "--which",
        "student",
        "--image-size",
        str(SIZE),
        "--out",
        str(tmp_path / "student" / "s.onnx"),
    )
    assert result.exit_code != 0 and "student_full.pt" in result.output
