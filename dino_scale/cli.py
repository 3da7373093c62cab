"""The `dino-scale` command line."""

from __future__ import annotations

import json

import click

from dino_scale import checkpoint as ckpt
from dino_scale.train import train_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dino-scale")
def main() -> None:
    """DINO self-supervised training, from one CPU to many GPUs."""


main.add_command(train_command)


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
    from dino_scale.data import write_shards

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
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors file.")
def convert_command(source: str, arch: str, which: str, timm_kwargs: str, out: str) -> None:
    """Import a backbone (e.g. an official DINO checkpoint) as timm-named safetensors, verified by loading it."""
    from dino_scale.models import create_backbone

    try:
        extra = json.loads(timm_kwargs)
        weights = ckpt.extract_backbone_state_dict(source, which=which)
        backbone = create_backbone(arch, **extra)
        ckpt.load_backbone_weights(backbone, weights, source=source)
    except (ValueError, ckpt.CheckpointError) as error:  # JSON, architecture mismatch, unreadable file
        raise click.ClickException(str(error)) from None
    state = {name: tensor.detach().contiguous() for name, tensor in backbone.state_dict().items()}
    ckpt.save_safetensors(state, out, metadata={"arch": arch, "timm_kwargs": json.dumps(extra), "source": source})
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
@click.option("--image-size", default=224, show_default=True, type=int, help="Fixed input size (square).")
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
@click.option("--parity-shards", help="Shards whose images the parity gate runs [default: shards/sample/val].")
def export_command(fmt: str, timm_kwargs: str | None, **kwargs: object) -> None:
    """Export a backbone (teacher by default) to ONNX / TensorRT / AOTInductor, parity-gated, with a sidecar JSON."""
    import shlex
    import sys

    from dino_scale.export import ExportOptions, ParityError, run_export
    from dino_scale.runtimes import RuntimeUnavailable

    try:
        extra = json.loads(timm_kwargs) if timm_kwargs else None
    except ValueError as error:
        raise click.BadParameter(f"not valid JSON: {error}", param_hint="--timm-kwargs") from None
    options = ExportOptions(format=fmt, timm_kwargs=extra, command=shlex.join(["dino-scale", *sys.argv[1:]]), **kwargs)
    try:
        run_export(options, echo=click.echo)
    except (ValueError, ParityError, RuntimeUnavailable, FileNotFoundError, ckpt.CheckpointError) as error:
        raise click.ClickException(str(error)) from None


@main.command("bench")
@click.option("--model", required=True, type=click.Path(exists=True), help="An exported artifact (with sidecar).")
@click.option("--batch", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--runtimes", help="Comma-separated subset, e.g. pytorch-eager,onnxruntime:CPU [default: all here].")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=0))
@click.option("--iterations", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the results as JSON here.")
def bench_command(**kwargs: object) -> None:
    """Throughput (images/s) and latency percentiles of an exported model in every runtime available here."""
    from dino_scale.bench import BenchOptions, run_bench

    try:
        run_bench(BenchOptions(**kwargs), echo=click.echo)
    except (ValueError, FileNotFoundError) as error:  # bad artifact / sidecar / --runtimes / --device
        raise click.ClickException(str(error)) from None


@main.command("attention")
@click.option("--model", "model_source", required=True, type=click.Path(exists=True), help="Run dir or checkpoint.")
@click.option("--image", "image_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs.")
@click.option("--image-size", default=224, show_default=True, type=int, help="The image is resized to this square.")
@click.option("--keep", default=0.6, show_default=True, type=float, help="Attention mass each head's mask keeps.")
@click.option("--which", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True)
@click.option("--arch", help="timm model name; needed only where the checkpoint does not record it.")
def attention_command(**kwargs: object) -> None:
    """Last-layer CLS attention of a ViT on one image: a PNG per head, and the heads' 60%-mass masks overlaid."""
    from dino_scale.attention import attention_maps

    try:
        summary = attention_maps(**kwargs)
    except (ValueError, FileNotFoundError, ckpt.CheckpointError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {len(summary['files'])} PNGs ({summary['heads']} heads) to {kwargs['out_dir']}")


if __name__ == "__main__":
    main()
