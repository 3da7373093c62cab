"""The `dino-scale` command line."""

from __future__ import annotations

import click

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
    import json

    from dino_scale import checkpoint as ckpt
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


if __name__ == "__main__":
    main()
