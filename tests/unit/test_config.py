import json
from pathlib import Path

import pytest

from dino_scale.config import ConfigError, load_config, resolve_config_path, shipped_recipes_dir

RECIPES = sorted(p.name for p in shipped_recipes_dir().glob("*.json"))


def write(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(content))
    return path


MINIMAL = {"deepspeed": {"train_micro_batch_size_per_gpu": 4}}


@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_validates(name: str) -> None:
    cfg = load_config(name)
    assert cfg.micro_batch_size >= 1


def test_paper_recipes_are_shipped() -> None:
    assert {"vits16.json", "vits8.json", "vitb16.json", "vitb8.json", "resnet50.json"} <= set(RECIPES)
    cfg = load_config("vits16.json")
    assert (cfg.dino.student_temp, cfg.dino.center_momentum, cfg.model.out_dim) == (0.1, 0.9, 65536)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.clip_grad) == (0.04, 0.4, 3.0)


def test_bare_name_resolves_to_shipped_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("vitb8.json") == shipped_recipes_dir() / "vitb8.json"
    assert resolve_config_path("vitb8") == shipped_recipes_dir() / "vitb8.json"
    (tmp_path / "vitb8.json").write_text(json.dumps(MINIMAL))
    assert resolve_config_path("vitb8.json") == Path("vitb8.json")  # a file where the user stands wins


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.json"):
        load_config(tmp_path / "nope.json")


def test_dotted_overrides_reach_nested_values(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    cfg = load_config(path, ["optim.lr=1e-3", "deepspeed.zero_optimization.stage=3", "max_steps=5", "backend=local"])
    assert cfg.optim.lr == 1e-3
    assert cfg.deepspeed["zero_optimization"] == {"stage": 3}
    assert (cfg.max_steps, cfg.backend) == (5, "local")


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("optim.lrr=1", "optim.lrr", "unknown key"),
        ('epochs="ten"', "epochs", "valid integer"),
        ("optim.lr=-1", "optim.lr", "greater than 0"),
        ('model.use_bn_in_head="yes"', "model.use_bn_in_head", "boolean"),
        ("backend=mpi", "backend", "'local'"),
        (
            "deepspeed.train_micro_batch_size_per_gpu=0",
            "deepspeed.train_micro_batch_size_per_gpu",
            "positive",
        ),
        ("data.local_crops_scale=[0.5,0.1]", "local_crops_scale", "0 < min <= max <= 1"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, override: str, key: str, fragment: str) -> None:
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    message = str(info.value)
    assert str(path) in message and key in message and fragment in message


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, {**MINIMAL, "model": {"archh": "vit_small_patch16_224"}})
    with pytest.raises(ConfigError, match=r"model\.archh: unknown key"):
        load_config(path)


def test_invalid_json_and_bad_override_syntax(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json is not valid JSON"):
        load_config(path)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, MINIMAL), ["optim.lr"])


def test_micro_batch_is_required_and_precisions_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is required"):
        load_config(write(tmp_path, {"deepspeed": {}}))
    both = {
        "deepspeed": {
            "train_micro_batch_size_per_gpu": 2,
            "bf16": {"enabled": True},
            "fp16": {"enabled": True},
        }
    }
    with pytest.raises(ConfigError, match="only one of bf16 / fp16 / torch_autocast"):
        load_config(write(tmp_path, both))


def test_global_batch_is_micro_times_accumulation_times_world(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, {"deepspeed": {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}})
    )
    assert cfg.batch_plan(world_size=2).global_batch == 64


def test_global_batch_fixes_accumulation_for_each_world_size(tmp_path: Path) -> None:
    recipe = {"deepspeed": {"train_micro_batch_size_per_gpu": 8, "train_batch_size": 64}}
    cfg = load_config(write(tmp_path, recipe))
    assert [cfg.batch_plan(world).accumulation_steps for world in (1, 2, 8)] == [8, 4, 1]
    assert {cfg.batch_plan(world).global_batch for world in (1, 2, 8)} == {64}
    with pytest.raises(ValueError, match="train_batch_size=64 is not a multiple of micro batch 8 x 3"):
        cfg.batch_plan(3)
    clash = {
        "deepspeed": {"train_micro_batch_size_per_gpu": 8, "train_batch_size": 64, "gradient_accumulation_steps": 2}
    }
    with pytest.raises(ValueError, match="needs gradient_accumulation_steps=8"):
        load_config(write(tmp_path, clash)).batch_plan(1)
    # Without train_batch_size the global batch follows the world size.
    free = load_config(write(tmp_path, {"deepspeed": {"train_micro_batch_size_per_gpu": 8}}))
    assert free.batch_plan(4).global_batch == 32


def test_torch_autocast_block_sets_the_precision(tmp_path: Path) -> None:
    block = {"train_micro_batch_size_per_gpu": 2, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    cfg = load_config(write(tmp_path, {"deepspeed": block}))
    assert (cfg.autocast_dtype, cfg.bf16, cfg.fp16) == ("bfloat16", True, False)
    block["torch_autocast"]["dtype"] = "int8"
    with pytest.raises(ConfigError, match="torch_autocast.dtype must be one of"):
        load_config(write(tmp_path, {"deepspeed": block}))


def test_config_error_is_one_line_with_faults_joined(tmp_path: Path) -> None:
    path = write(tmp_path, {**MINIMAL, "epochs": 0})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"invalid config {path}: epochs: Input should be greater than 0 (got 0)"
    path = write(tmp_path, {**MINIMAL, "epochs": 0, "optim": {"lrr": 1}})
    with pytest.raises(ConfigError) as info:
        load_config(path, ["seed=-1"])
    assert str(info.value) == (
        f"invalid config {path} (with --set seed=-1): seed: Input should be greater than or equal to 0 (got -1); "
        "epochs: Input should be greater than 0 (got 0); optim.lrr: unknown key"
    )


def test_values_at_the_bounds_are_accepted(tmp_path: Path) -> None:
    top = {"seed": 2**32 - 1, "epochs": 10_000, "max_steps": 10**9, "log_every": 10**9, "checkpoint_every": 10**9}
    top |= {"keep_checkpoints": 10_000, "skip_nonfinite_steps": 10**6}
    model = {"out_dim": 2**20, "hidden_dim": 65536, "bottleneck_dim": 65536, "head_layers": 32}
    data = {"samples_per_epoch": 10**10, "num_workers": 256, "shuffle_buffer": 10**6, "local_crops_number": 64}
    data |= {"global_crop_size": 4096, "local_crop_size": 4096, "max_skipped_fraction": 1.0}
    optim = {"lr": 100.0, "min_lr": 100.0, "warmup_epochs": 10_000, "weight_decay": 10.0, "weight_decay_end": 10}
    optim |= {"freeze_last_layer": 10_000}
    dino = {"student_temp": 10.0, "warmup_teacher_temp": 1e-3, "teacher_temp": 10, "warmup_teacher_temp_epochs": 1e4}
    monitor = {"patience_steps": 10**9, "low_kl": 100.0, "low_entropy": 0.0, "high_entropy": 1.0}
    evaluation = {"knn_k": 10_000, "knn_temperature": 1e-3, "image_size": 4096, "batch_size": 65536}
    deepspeed = {"train_micro_batch_size_per_gpu": 2**20, "gradient_accumulation_steps": 2**20}
    deepspeed |= {"train_batch_size": 2**30, "gradient_clipping": 1e300, "zero_optimization": {"stage": 3}}
    recipe = top | {"model": model, "data": data, "optim": optim, "dino": dino, "monitor": monitor}
    cfg = load_config(write(tmp_path, recipe | {"eval": evaluation, "deepspeed": deepspeed}))
    assert (cfg.seed, cfg.epochs, cfg.data.samples_per_epoch, cfg.optim.lr) == (2**32 - 1, 10_000, 10**10, 100.0)
    assert (cfg.micro_batch_size, cfg.clip_grad, cfg.zero_stage) == (2**20, 1e300, 3)


def test_timm_kwargs_take_json_scalars_and_lists(tmp_path: Path) -> None:
    kwargs = {"img_size": [32, 32], "act_layer": "gelu", "qkv_bias": False, "init_values": None, "mlp_ratio": 4.0}
    cfg = load_config(write(tmp_path, {**MINIMAL, "model": {"timm_kwargs": kwargs}}))
    assert cfg.model.timm_kwargs == kwargs


def test_utf8_with_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({**MINIMAL, "name": "caf\u00e9"}).encode())
    assert load_config(path).name == "caf\u00e9"
