"""The `dino-scale` command line: thin commands over the rooms below it.

Every command reports bad input (a DinoScaleError) as one line naming the flag, through dino_scale.command. Nothing
heavy is imported at start-up (each command imports what it runs), so that `dino-scale --help` answers at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import click

from dino_scale.command import Group
from dino_scale.train.command import run_leaving_gloo_job, train_command

# The image-size rule of every command that takes a model (dino_scale.models.weights.choose_image_size).
_SIZE_DEFAULT = (
    "the size the model was trained at (its run, checkpoint or safetensors), else the timm model's input size"
)


def _threads_option(command: Callable) -> Callable:
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        help="Intra-op threads of this process [default: the cores left after one per DataLoader worker].",
    )(command)


def _set_threads(threads: int | None, workers: int | None) -> int:
    """Share the cores before any work: ``threads`` intra-op threads (default: the cores left after one per DataLoader
    worker, each of which runs one thread), so the model and the decoders do not oversubscribe the machine."""
    from dino_scale.data.loaders import default_workers
    from dino_scale.devices import set_threads

    return set_threads(threads, default_workers() if workers is None else workers)


def _json_out_option(command: Callable) -> Callable:
    return click.option(
        "--json",
        "json_out",
        type=click.Path(dir_okay=False, allow_dash=True),
        metavar="PATH|-",
        help="Write the results as JSON to this file; '-' prints them on standard output (and the rest on stderr).",
    )(command)


def _json_target(json_out: str | None) -> tuple[str | None, Callable[[str], None]]:
    """For ``--json PATH|-``: the file the library writes (None for '-') and where the human-readable lines go (stderr
    for '-', so that standard output holds the JSON alone)."""
    if json_out == "-":
        return None, lambda line: click.echo(line, err=True)
    return json_out, click.echo


def _print_json(json_out: str | None, result: object) -> None:
    """``--json -``: the results as JSON on standard output."""
    if json_out == "-":
        click.echo(json.dumps(result, indent=2))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dino-scale")
def main() -> None:
    """DINO self-supervised training, from one CPU to many GPUs."""


main.add_command(train_command)


def run() -> None:
    """The ``dino-scale`` program: :func:`main`, and a rank of a gloo job started as ``torchrun --no-python dino-scale
    train`` leaves without the interpreter's teardown, as one of ``python -m dino_scale.train`` does."""
    run_leaving_gloo_job(main)


@main.command("shard")
@click.option(
    "--images",
    "images_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Image folder; first-level subfolders are classes.",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Where to write shards.")
@click.option("--maxcount", default=1000, show_default=True, type=click.IntRange(min=1), help="Samples per shard.")
@click.option("--prefix", default="shard", show_default=True, help="Shard file name prefix.")
@click.option("--max-image-side", type=click.IntRange(min=16), help="Re-encode images larger than this.")
def shard_command(images_dir: str, out_dir: str, maxcount: int, prefix: str, max_image_side: int | None) -> None:
    """Write WebDataset .tar shards (plus classes.json and shards.json) from an image folder."""
    from dino_scale.data.shards import write_shards

    report = write_shards(
        images_dir, out_dir, maxcount=maxcount, prefix=prefix, max_image_side=max_image_side, progress=True
    )
    click.echo(f"wrote {report.written} images into {len(report.shards)} shard(s) in {out_dir}")
    if report.skipped:
        click.echo(f"skipped {len(report.skipped)} unreadable file(s):", err=True)
        for path, reason in report.skipped:
            click.echo(f"  {path}: {reason}", err=True)


@main.command("convert")
@click.option(
    "--checkpoint",
    "source",
    required=True,
    type=click.Path(exists=True),
    help="Our run dir / checkpoint / safetensors, or an official facebookresearch/dino .pth.",
)
@click.option("--arch", required=True, help="timm model name the weights belong to, e.g. vit_small_patch16_224.")
@click.option("--which", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True)
@click.option("--timm-kwargs", default="{}", show_default=True, help="JSON of extra timm.create_model arguments.")
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    help="The size the weights were trained at, recorded in the output [default: the source's record, else the "
    "timm model's img_size].",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors file.")
def convert_command(source: str, arch: str, which: str, timm_kwargs: str, image_size: int | None, out: str) -> None:
    """Import a backbone (e.g. an official DINO checkpoint) as timm-named safetensors, verified by loading it."""
    from dino_scale.errors import ConfigError, blame
    from dino_scale.io import save_safetensors
    from dino_scale.models.backbones import create_backbone
    from dino_scale.models.weights import IMAGE_SIZE_METADATA_KEY, choose_image_size, load_backbone_weights, load_source

    extra = _json_option(timm_kwargs, "--timm-kwargs")
    with blame("source"):
        loaded = load_source(source, which=which)
    try:
        with blame("arch"):
            backbone = create_backbone(arch, **extra)
    except ConfigError as error:  # kwargs the arch does not take: this command's flag, not the recipe key
        error.argument = "timm_kwargs"
        raise
    load_backbone_weights(backbone, loaded.weights, source=source)
    size = choose_image_size(loaded, image_size, arch, extra)
    click.echo(size.describe())
    state = {name: tensor.detach().contiguous() for name, tensor in backbone.state_dict().items()}
    metadata = {"arch": arch, "timm_kwargs": json.dumps(extra), "source": source}
    save_safetensors(state, out, metadata={**metadata, IMAGE_SIZE_METADATA_KEY: str(size.value)})
    click.echo(f"wrote {out}: {arch} backbone, {len(state)} tensors, from {source} ({which})")


@main.command("export")
@click.option(
    "--checkpoint",
    type=click.Path(exists=True),
    help="Run dir, checkpoint, teacher_backbone.safetensors or official DINO .pth [default: the newest run in runs/].",
)
@click.option("--format", "fmt", type=click.Choice(["onnx", "tensorrt", "aoti"]), default="onnx", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Artifact path [default: export/<run name>.<ext>].")
@click.option("--which", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True)
@click.option("--arch", help="timm model name; needed only where the checkpoint does not record it.")
@click.option("--timm-kwargs", help="JSON of timm.create_model arguments, replacing the recorded ones.")
@click.option("--image-size", type=int, help=f"Fixed input size (square) [default: {_SIZE_DEFAULT}].")
@click.option(
    "--outputs",
    default="cls",
    show_default=True,
    help="Comma-separated: cls, patch_gem (GeM p=4 of patch tokens), attn (last-layer CLS attention per head).",
)
@click.option("--uint8", "uint8_input", is_flag=True, help="Take uint8 NHWC RGB; normalise inside the graph.")
@click.option("--fp16", "precision", flag_value="fp16", help="Half-precision compute (cosine >= 0.999 gate).")
@click.option("--bf16", "precision", flag_value="bf16", help="bfloat16 compute (tensorrt / aoti).")
@click.option("--fp32", "precision", flag_value="fp32", default=True, help="Full precision (default).")
@click.option("--opset", type=int, help="ONNX opset [default: torch's].")
@click.option("--min-batch", default=1, show_default=True, type=int, help="TensorRT profile minimum batch.")
@click.option("--opt-batch", type=int, help="TensorRT profile batch tuned for [default: min(64, --max-batch)].")
@click.option("--max-batch", default=256, show_default=True, type=int, help="Largest batch (TensorRT / AOTI).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache, read and updated.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda (AOTI compiles for it).")
@click.option(
    "--parity-shards",
    help="Shards, or a folder of images, that the parity gate runs [default: shards/sample/val, where present].",
)
@_threads_option
def export_command(fmt: str, timm_kwargs: str | None, threads: int | None, **kwargs: object) -> None:
    """Export a backbone (teacher by default) to ONNX / TensorRT / AOTInductor, parity-gated, with a sidecar JSON."""
    import shlex
    import sys

    from dino_scale.export.exporter import ExportOptions, run_export

    _set_threads(threads, workers=0)  # the parity gate reads its few images in this process
    extra = _json_option(timm_kwargs, "--timm-kwargs") if timm_kwargs else None
    options = ExportOptions(format=fmt, timm_kwargs=extra, command=shlex.join(["dino-scale", *sys.argv[1:]]), **kwargs)
    run_export(options, echo=click.echo)


@main.command("bench")
@click.option("--model", required=True, type=click.Path(exists=True), help="An exported artifact (with sidecar).")
@click.option("--batch", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--runtimes", help="Comma-separated subset, e.g. pytorch-eager,onnxruntime:CPU [default: all here].")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=0))
@click.option("--iterations", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@_json_out_option
@_threads_option
def bench_command(json_out: str | None, threads: int | None, **kwargs: object) -> None:
    """Throughput (images/s) and latency percentiles of an exported model in every runtime available here."""
    from dino_scale.export.bench import BenchOptions, run_bench

    _set_threads(threads, workers=0)
    path, echo = _json_target(json_out)
    _print_json(json_out, run_bench(BenchOptions(**kwargs, json_out=path), echo=echo))


@main.command("attention")
@click.option("--model", "model_source", required=True, type=click.Path(exists=True), help="Run dir or checkpoint.")
@click.option(
    "--images",
    "--image",
    "images",
    required=True,
    type=click.Path(exists=True),
    help="An image file, or a folder searched recursively (unreadable images are skipped and counted).",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the figures.")
@click.option("--image-size", type=click.IntRange(min=1), help="[default: the size the model was trained at]")
@click.option("--keep", default=0.6, show_default=True, type=float, help="Attention mass each head's mask keeps.")
@click.option("--which", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True)
@click.option("--arch", help="timm model name; needed only where the checkpoint does not record it.")
@_threads_option
def attention_command(threads: int | None, **kwargs: object) -> None:
    """Last-layer CLS attention of a ViT: per image one PNG (the input, each head's map in a colour map, the heads'
    60%-mass masks as outlines), and attention.json."""
    from dino_scale.eval.attention import attention_maps

    _set_threads(threads, workers=0)
    attention_maps(**kwargs, echo=click.echo)


@main.command("plot")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="The PNG to write [default: RUN/curves.png].")
def plot_command(run_dir: str, out: str | None) -> None:
    """Training curves of a run in one figure: loss, teacher entropy vs log K, KL, lr / wd, momentum / teacher
    temperature, img/s."""
    from pathlib import Path

    from dino_scale.eval.plots import plot_run

    click.echo(f"wrote {plot_run(Path(run_dir), Path(out) if out else None)}")


# ----------------------------------------------------------------------------------------------------------
# Retrieval and evaluation
# ----------------------------------------------------------------------------------------------------------

_MODEL_HELP = "Exported artifact (with sidecar), run dir or checkpoint [default: the newest artifact in export/]."


def _loader_options(command: Callable) -> Callable:
    for option in reversed(
        [
            click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1)),
            click.option("--workers", type=click.IntRange(min=0), help="DataLoader decode workers [default: cores-1]."),
            click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda (PyTorch models)."),
            _threads_option,
        ]
    ):
        command = option(command)
    return command


_RUN_SIZE_HELP = f"Input size [default: an artifact's own; for a run or checkpoint {_SIZE_DEFAULT}]."


@main.command("index")
@click.option("--images", type=click.Path(exists=True, file_okay=False), help="Image folder (searched recursively).")
@click.option("--shards", help="Local WebDataset shards: a folder, glob or brace pattern.")
@click.option("--model", type=click.Path(exists=True), help=_MODEL_HELP)
@click.option("--out", type=click.Path(file_okay=False), help="Index folder [default: index/<model name>].")
@click.option("--descriptor", type=click.Choice(["cls", "cls+gem"]), help="[default: the index's, else cls]")
@click.option(
    "--index-type",
    type=click.Choice(["auto", "flat", "hnsw", "ivfpq"]),
    help="auto: exact below 100k vectors, HNSW above [default: the index's, else auto].",
)
@click.option("--whiten-on", help="Learn PCA whitening on these images (folder or shards) first.")
@click.option("--whiten-dim", type=click.IntRange(min=1), help="Whitened dimensions [default: all].")
@click.option(
    "--image-size", type=int, help=f"Input size [default: the index's, else an artifact's own, else {_SIZE_DEFAULT}]."
)
@click.option(
    "--shard-size",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1),
    help="Rows per committed embedding shard (the most an interruption loses).",
)
@_loader_options
def index_command(threads: int | None, **kwargs: object) -> None:
    """Embed images into a resumable, incremental faiss index (re-run to resume or to add new images)."""
    import shlex
    import sys

    from dino_scale.retrieval.index import IndexOptions, run_index

    _set_threads(threads, kwargs["workers"])
    run_index(IndexOptions(**kwargs, command=shlex.join(["dino-scale", *sys.argv[1:]])), echo=click.echo)


@main.command("search")
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--query", required=True, type=click.Path(exists=True), help="An image, or a folder of images.")
@click.option("-k", default=10, show_default=True, type=click.IntRange(min=1), help="Neighbours per query.")
@click.option("--model", type=click.Path(exists=True), help="[default: the index's model; must be the same weights]")
@_json_out_option
@_loader_options
def search_command(
    index_dir: str, query: str, k: int, model: str | None, json_out: str | None, threads: int | None, **kwargs: object
) -> None:
    """Ranked nearest indexed images (cosine similarity) of each query image."""
    from dino_scale.errors import blame
    from dino_scale.io import atomic_write_json
    from dino_scale.retrieval.index import search_images

    _set_threads(threads, kwargs["workers"])
    path, echo = _json_target(json_out)
    found = search_images(index_dir, query, k, model, echo=echo, **kwargs)
    if json_out == "-":
        _print_json(json_out, found)
        return
    if path:
        with blame("json_out"):
            atomic_write_json(path, found)
    for result in found["results"]:
        click.echo(f"query {result['query']}")
        if "error" in result:
            click.echo(f"  unreadable: {result['error']}")
        for hit in result["neighbours"]:
            click.echo(f"  {hit['rank']:>3d}  {hit['score']:.4f}  {hit['key']}")


@main.command("dedup")
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--threshold", required=True, type=float, help="Cosine similarity at or above which two are copies.")
@click.option("-k", default=20, show_default=True, type=click.IntRange(min=2), help="Neighbours examined per image.")
@_json_out_option
def dedup_command(index_dir: str, threshold: float, k: int, json_out: str | None) -> None:
    """Groups of near-duplicate images in an index (copy detection)."""
    from dino_scale.errors import blame
    from dino_scale.io import atomic_write_json
    from dino_scale.retrieval.index import find_duplicates

    found = find_duplicates(index_dir, threshold, k)
    path, echo = _json_target(json_out)
    if json_out != "-":  # with '-' the groups are in the JSON on standard output
        for number, group in enumerate(found["groups"], 1):
            echo(f"group {number}: {group['size']} images (similarity >= {group['min_score']:.4f})")
            for member in group["members"]:
                echo(f"  {member}")
    echo(f"{len(found['groups'])} group(s), {found['duplicates']} duplicate(s) among {found['images']} images")
    if path:
        with blame("json_out"):
            atomic_write_json(path, found)
    _print_json(json_out, found)


@main.group("eval", cls=Group)
def eval_group() -> None:
    """Evaluate frozen features: k-NN, linear probe, copy detection (attention maps: `dino-scale attention`)."""


def _json_option(value: str, flag: str) -> dict:
    try:
        parsed = json.loads(value)
    except ValueError as error:
        raise click.BadParameter(f"not valid JSON: {error}", param_hint=flag) from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"expected a JSON object, got {value!r}", param_hint=flag)
    return parsed


def _ks(value: str) -> list[int]:
    try:
        ks = [int(k) for k in value.split(",") if k.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint="-k") from None
    if not ks or min(ks) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}", param_hint="-k")
    return ks


@eval_group.command("knn")
@click.option("--model", type=click.Path(exists=True), help=_MODEL_HELP)
@click.option("--train", required=True, help="Labelled images: class folders, or shards with cls.")
@click.option("--test", required=True, help="Labelled images: class folders, or shards with cls.")
@click.option("-k", "ks", default="10,20,100,200", show_default=True, help="Comma-separated k values.")
@click.option("--temperature", default=0.07, show_default=True, type=float)
@click.option("--image-size", type=int, help=_RUN_SIZE_HELP)
@_json_out_option
@_loader_options
def eval_knn_command(ks: str, json_out: str | None, threads: int | None, **kwargs: object) -> None:
    """Weighted k-NN classification (top-1/top-5) on L2-normalised CLS features, as in the paper."""
    from dino_scale.eval.knn import knn_eval

    _set_threads(threads, kwargs["workers"])
    path, echo = _json_target(json_out)
    _print_json(json_out, knn_eval(ks=_ks(ks), json_out=path, echo=echo, **kwargs))


@eval_group.command("linear")
@click.option("--model", type=click.Path(exists=True), help=_MODEL_HELP)
@click.option("--train", required=True, help="Labelled images: class folders, or shards with cls.")
@click.option("--test", required=True, help="Labelled images: class folders, or shards with cls.")
@click.option(
    "--n-last-blocks",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="CLS tokens of this many last blocks (paper: 4 for ViT-S, 1 for ViT-B).",
)
@click.option("--avgpool-patchtokens", is_flag=True, help="Also the mean patch token (paper: ViT-B).")
@click.option("--epochs", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--which", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True)
@click.option("--image-size", type=int, help=_RUN_SIZE_HELP)
@_json_out_option
@_loader_options
def eval_linear_command(json_out: str | None, threads: int | None, **kwargs: object) -> None:
    """Linear probe on frozen features (CLS of the last n blocks, optionally + mean patch token)."""
    from dino_scale.eval.linear import linear_eval

    _set_threads(threads, kwargs["workers"])
    path, echo = _json_target(json_out)
    _print_json(json_out, linear_eval(json_out=path, echo=echo, **kwargs))


@eval_group.command("copy-detection")
@click.option("--model", type=click.Path(exists=True), help=_MODEL_HELP)
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False), help="The database images.")
@click.option(
    "--queries",
    default=200,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images to make a strong copy of (each copy is one query).",
)
@click.option("--descriptor", default="cls+gem", show_default=True, type=click.Choice(["cls", "cls+gem"]))
@click.option("--whiten-on", help="Learn PCA whitening on these images (folder or shards), as the paper.")
@click.option("--whiten-dim", type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--image-size", type=int, help=_RUN_SIZE_HELP)
@_json_out_option
@_loader_options
def eval_copy_detection_command(json_out: str | None, threads: int | None, **kwargs: object) -> None:
    """Copy detection: strong Copydays-style copies as queries, all images as the database; mAP and micro-AP."""
    from dino_scale.eval.copy_detection import copy_detection_eval

    _set_threads(threads, kwargs["workers"])
    path, echo = _json_target(json_out)
    _print_json(json_out, copy_detection_eval(json_out=path, echo=echo, **kwargs))


if __name__ == "__main__":
    main()
