"""Recipes that once misbehaved (a probe's corpus): each is refused before any work with a one-line ConfigError that
names the recipe file and the key at fault, on the library path (load_config) and on the command line (exit 1).

The bounds corpus is read off the models: every numeric setting has a lower and an upper bound, one value just past
each is refused naming its key, and its default is accepted."""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import annotated_types
import pytest
from click.testing import CliRunner
from pydantic import BaseModel
from support import ARCH, SAMPLE_TRAIN, TINY

from dino_scale.command import describe
from dino_scale.config import MAX_NESTING, ConfigError, TrainConfig, load_config
from dino_scale.models.backbones import create_backbone
from dino_scale.train.command import train_command

MINIMAL: dict[str, Any] = {"deepspeed": {"train_micro_batch_size_per_gpu": 4}}


def recipe(tmp_path: Path, **dotted: Any) -> Path:
    """MINIMAL with dotted keys set (`deepspeed__gradient_clipping` spells deepspeed.gradient_clipping), written
    with Python's json, which spells non-finite floats NaN / Infinity as a hand-edited recipe would."""
    content = json.loads(json.dumps(MINIMAL))
    for key, value in dotted.items():
        *parents, last = key.split("__")
        node = content
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(content))
    return path


def refused(path: Path, overrides: list[str] | None = None) -> str:
    """The message of the ConfigError load_config raises, checked to be one line naming the file."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message and len(message) < 1000, message
    assert str(path) in message, message
    return message


# --- the probe's corpus -----------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")

CORPUS = [
    # (id, dotted keys to set, the key the message must name, a fragment it must hold)
    ("epochs 1e12", {"epochs": 10**12}, "epochs", "less than or equal to 10000"),
    ("samples 1e15", {"data__samples_per_epoch": 10**15}, "data.samples_per_epoch", "less than or equal"),
    ("seed 2**70", {"seed": 2**70}, "seed", "less than or equal to 4294967295"),
    ("seed -1", {"seed": -1}, "seed", "greater than or equal to 0"),
    ("lr inf", {"optim__lr": INF}, "optim.lr", "finite"),
    ("lr 5e4", {"optim__lr": 5e4}, "optim.lr", "less than or equal to 100"),
    ("lr 1e300 int", {"optim__lr": 10**300}, "optim.lr", "about 301 digits"),
    ("weight decay inf", {"optim__weight_decay": INF}, "optim.weight_decay", "finite"),
    ("min lr nan", {"optim__min_lr": NAN}, "optim.min_lr", "finite"),
    ("crops scale nan", {"data__global_crops_scale": [NAN, 1.0]}, "data.global_crops_scale", "finite"),
    ("clip nan", {"deepspeed__gradient_clipping": NAN}, "deepspeed.gradient_clipping", "finite"),
    ("clip inf", {"deepspeed__gradient_clipping": INF}, "deepspeed.gradient_clipping", "finite"),
    ("clip -1", {"deepspeed__gradient_clipping": -1}, "deepspeed.gradient_clipping", ">= 0"),
    (
        "deepspeed nested nan",
        {"deepspeed__optimizer": {"params": {"betas": [0.9, NAN]}}},
        "deepspeed.optimizer.params.betas[1]",
        "finite",
    ),
    ("deepspeed int 2**64", {"deepspeed__steps_per_print": 2**64}, "deepspeed.steps_per_print", "64 bits"),
    (
        "micro batch 2**20+1",
        {"deepspeed__train_micro_batch_size_per_gpu": 2**20 + 1},
        "deepspeed.train_micro_batch_size_per_gpu",
        "at most 1048576",
    ),
    (
        "accumulation 2**20+1",
        {"deepspeed__gradient_accumulation_steps": 2**20 + 1},
        "deepspeed.gradient_accumulation_steps",
        "at most 1048576",
    ),
    (
        "global batch 2**30+1",
        {"deepspeed__train_batch_size": 2**30 + 1},
        "deepspeed.train_batch_size",
        "at most 1073741824",
    ),
    ("zero stage 7", {"deepspeed__zero_optimization": {"stage": 7}}, "deepspeed.zero_optimization", "0 .. 3"),
    ("zero not object", {"deepspeed__zero_optimization": 3}, "deepspeed.zero_optimization", "object"),
    ("autocast dtype list", {"deepspeed__torch_autocast": {"dtype": []}}, "deepspeed.torch_autocast.dtype", "one of"),
    ("timm key not identifier", {"model__timm_kwargs": {"no such": 1}}, "model.timm_kwargs", "identifier"),
    ("timm value object", {"model__timm_kwargs": {"depth": {"x": 1}}}, "model.timm_kwargs", "depth must be"),
    ("timm value nested list", {"model__timm_kwargs": {"img_size": [[32]]}}, "model.timm_kwargs", "img_size"),
    ("timm value nan", {"model__timm_kwargs": {"init_values": NAN}}, "model.timm_kwargs", "init_values"),
    ("timm pretrained", {"model__timm_kwargs": {"pretrained": True}}, "model.timm_kwargs", "init_backbone"),
    ("timm drop path", {"model__timm_kwargs": {"drop_path_rate": 0.2}}, "model.timm_kwargs", "model.drop_path_rate"),
    ("timm num classes", {"model__timm_kwargs": {"num_classes": 10}}, "model.timm_kwargs", "num_classes"),
    ("timm kwargs list", {"model": {"timm_kwargs": [1]}}, "model.timm_kwargs", "valid dictionary"),
    ("teacher temp 1e-4", {"dino__teacher_temp": 1e-4}, "dino.teacher_temp", "greater than or equal to 0.001"),
    ("wrong type int", {"epochs": "ten"}, "epochs", "valid integer"),
    ("wrong type float int", {"epochs": 10.0}, "epochs", "valid integer"),
    ("wrong type section", {"optim": "adamw"}, "optim", "valid dictionary"),
    ("wrong type bool", {"model__use_bn_in_head": "yes"}, "model.use_bn_in_head", "boolean"),
    ("unknown key", {"model__archh": "resnet50"}, "model.archh", "unknown key"),
    ("unknown key with newline", {"foo\nbar": 1}, r"'foo\nbar'", "unknown key"),
]


@pytest.mark.parametrize(("dotted", "key", "fragment"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_probe_corpus_is_refused_naming_file_and_key(
    tmp_path: Path, dotted: dict[str, Any], key: str, fragment: str
) -> None:
    message = refused(recipe(tmp_path, **dotted))
    assert key in message and fragment in message, message


# --- bounds, read off the models --------------------------------------------------------------------------------


def numeric_settings(model: type[BaseModel] = TrainConfig, prefix: str = "") -> Iterator[tuple[str, type, Any]]:
    """(dotted key, int or float, pydantic FieldInfo) for every numeric setting of the recipe."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from numeric_settings(annotation, f"{prefix}{name}.")
            continue
        if typing.get_origin(annotation) in (list, dict):
            continue  # the crop scales (checked by DataConfig._check_scales), timm_kwargs, the deepspeed block
        kinds = {annotation} | set(typing.get_args(annotation))
        kind = int if int in kinds else float if float in kinds else None
        if kind is not None and bool not in kinds:
            yield f"{prefix}{name}", kind, field


def bound(field: Any, *kinds: type) -> Any:
    return next((getattr(m, k.__name__.lower()) for m in field.metadata for k in kinds if isinstance(m, k)), None)


SETTINGS = list(numeric_settings())


def past_the_bounds() -> Iterator[Any]:
    """(key, value) for one value just above each upper bound and just below each lower bound."""
    for key, kind, field in SETTINGS:
        step = 1 if kind is int else None
        le, lt = bound(field, annotated_types.Le), bound(field, annotated_types.Lt)
        ge, gt = bound(field, annotated_types.Ge), bound(field, annotated_types.Gt)
        if le is not None:
            yield pytest.param(key, le + step if step else math.nextafter(le, math.inf), id=f"{key} > {le}")
        if lt is not None:
            yield pytest.param(key, lt, id=f"{key} = {lt}")
        if ge is not None:
            yield pytest.param(key, ge - step if step else math.nextafter(ge, -math.inf), id=f"{key} < {ge}")
        if gt is not None:
            yield pytest.param(key, gt, id=f"{key} = {gt}")


def test_every_numeric_setting_has_both_bounds() -> None:
    # The enumeration reaches the nested sections.
    assert {"seed", "data.samples_per_epoch", "optim.lr", "monitor.low_kl", "eval.knn_k"} <= {k for k, _, _ in SETTINGS}
    unbounded = [
        key
        for key, _, field in SETTINGS
        if bound(field, annotated_types.Le, annotated_types.Lt) is None
        or bound(field, annotated_types.Ge, annotated_types.Gt) is None
    ]
    assert unbounded == []


@pytest.mark.parametrize(("key", "value"), list(past_the_bounds()))
def test_just_past_each_bound_is_refused_naming_the_key(tmp_path: Path, key: str, value: Any) -> None:
    message = refused(recipe(tmp_path, **{key.replace(".", "__"): value}))
    assert f": {key}: Input should be" in message, message


@pytest.mark.parametrize("key", [key for key, _, field in SETTINGS if field.default is not None])
def test_each_default_is_accepted_when_written_out(tmp_path: Path, key: str) -> None:
    default = next(field.default for name, _, field in SETTINGS if name == key)
    cfg = load_config(recipe(tmp_path, **{key.replace(".", "__"): default}))
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == default


# --- the file itself --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        pytest.param(b"[" * 100_000, "nest deeper than", id="100k ["),
        pytest.param(b'{"a": ' * 100_000, "nest deeper than", id="100k {"),
        pytest.param(b'{"name": "caf\xe9"}', "not UTF-8 text (byte 0xe9 at offset 13)", id="latin-1 byte"),
        pytest.param(b"\xff\xfe{\x00}\x00", "not UTF-8 text", id="utf-16"),
        pytest.param(b"[1, 2]", "JSON object at the top level, got list", id="top-level list"),
        pytest.param(b'"vits16"', "JSON object at the top level, got str", id="top-level string"),
        pytest.param(b"null", "JSON object at the top level, got NoneType", id="top-level null"),
        pytest.param(b'{"seed": ' + b"1" * 5000 + b"}", "not valid JSON: Exceeds the limit", id="5000-digit int"),
        pytest.param(b'{"seed": 1', "not valid JSON", id="truncated"),
        pytest.param(b"", "not valid JSON", id="empty"),
    ],
)
def test_unusable_file_is_one_line_naming_it(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "recipe.json"
    path.write_bytes(content)
    message = refused(path)
    assert fragment in message, message


def test_a_name_too_long_for_the_file_system_is_not_found() -> None:
    with pytest.raises(ConfigError, match=r"^config file not found: a{100}.*\.\.\. \(shipped recipes: "):
        load_config("a" * 5000)


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def test_nesting_is_bounded_exactly_at_the_limit(tmp_path: Path) -> None:
    # The top level is level 1 and the deepspeed block level 2, so the deepest list allowed is MAX_NESTING - 2 deep.
    load_config(recipe(tmp_path, deepspeed__x=nested(MAX_NESTING - 2)))
    message = refused(recipe(tmp_path, deepspeed__x=nested(MAX_NESTING - 1)))
    assert "deepspeed.x[0]" in message and f"nest deeper than {MAX_NESTING} levels" in message


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        pytest.param("deepspeed.x=" + "[" * 100_000, "--set deepspeed.x: objects and lists nest deeper", id="100k ["),
        pytest.param(
            "deepspeed.x=" + '{"a":' * 100_000, "--set deepspeed.x: objects and lists nest deeper", id="100k {"
        ),
        pytest.param("deepspeed.x=" + json.dumps(nested(40)), "deepspeed.x[0][0]", id="40 levels"),
        pytest.param("seed=" + "9" * 5000, "--set seed: Exceeds the limit", id="5000-digit int"),
        pytest.param("seed=1e400", "seed: Input should be a valid integer", id="1e400"),
        pytest.param("optim.lr=Infinity", "optim.lr: Input should be a finite number", id="lr Infinity"),
        pytest.param("deepspeed.gradient_clipping=NaN", "deepspeed.gradient_clipping must be a finite", id="clip NaN"),
        pytest.param(
            "deepspeed.train_micro_batch_size_per_gpu.x=1",
            ": deepspeed.train_micro_batch_size_per_gpu is not an object",
            id="into a number",
        ),
        pytest.param("seed", "--set expects key=value", id="no ="),
    ],
)
def test_bad_override_is_one_line_naming_file_and_key(tmp_path: Path, override: str, fragment: str) -> None:
    message = refused(recipe(tmp_path), [override])
    assert fragment in message, message


def test_several_faults_share_one_line(tmp_path: Path) -> None:
    path = recipe(tmp_path, epochs=0, optim__lr=INF, **{f"k{i}": i for i in range(12)})
    message = refused(path)
    assert message.startswith(f"invalid config {path}: ")
    assert "epochs: Input should be greater than 0 (got 0); optim.lr: Input should be a finite number" in message
    assert message.endswith("; ... (+4 more)"), message  # 14 faults: 10 shown


# --- timm kwargs the arch does not take -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("junk", "fragment"),
    [
        ({"no_such_arg": 1}, f"{ARCH} does not take no_such_arg"),
        ({"no_such_arg": 1, "other_junk": [1]}, f"{ARCH} does not take no_such_arg, other_junk"),
        ({"depth": "x"}, f'{ARCH} cannot be built with {{"img_size": 32'),
        ({"embed_dim": 50}, "AssertionError: dim should be divisible by num_heads"),
        ({"num_heads": 0}, "ZeroDivisionError"),
        ({"act_layer": "no_such_activation"}, "KeyError: 'no_such_activation'"),
    ],
)
def test_timm_kwargs_junk_blames_model_timm_kwargs(junk: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_backbone(ARCH, **{**TINY, **junk})
    message = describe(info.value, train_command.params)  # as `train` prints it
    assert "\n" not in message and message.startswith("model.timm_kwargs: ") and fragment in message, message
    assert info.value.argument == "model.timm_kwargs"


def test_unknown_arch_is_still_named_as_such() -> None:
    with pytest.raises(ValueError, match="timm has no model named 'no_such_arch'"):
        create_backbone("no_such_arch", depth=2)


# --- the command line -------------------------------------------------------------------------------------------


def error_line(result: Any) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_cli_refuses_a_bad_recipe_with_one_line_and_status_1(tmp_path: Path) -> None:
    path = recipe(tmp_path, epochs=10**12)
    line = error_line(CliRunner().invoke(train_command, ["--config", str(path)]))
    assert f"invalid config {path}: epochs: Input should be less than or equal to 10000" in line
    line = error_line(CliRunner().invoke(train_command, ["--config", str(path), "--set", "seed=" + "[" * 100_000]))
    assert str(path) in line and "--set seed: objects and lists nest deeper" in line


def test_cli_names_timm_kwargs_the_arch_does_not_take(tmp_path: Path) -> None:
    path = recipe(
        tmp_path,
        device="cpu",
        output_dir=str(tmp_path / "run"),
        model={"arch": ARCH, "timm_kwargs": {**TINY, "no_such_arg": 1}, "out_dim": 16, "hidden_dim": 16},
        data={"train_shards": SAMPLE_TRAIN, "samples_per_epoch": 16, "num_workers": 0},
    )
    line = error_line(CliRunner().invoke(train_command, ["--config", str(path)]))
    assert line.startswith(f"Error: model.timm_kwargs: {ARCH} does not take no_such_arg"), line
