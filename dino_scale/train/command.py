"""The `train` command: `python -m dino_scale.train`, `dino-scale train`, and what deepspeed / torchrun launch.

Only click is imported here, so that `dino-scale --help` stays fast; the training code loads when the command runs.
"""

from __future__ import annotations

import json

import click

from dino_scale.command import Command


@click.command("train", cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, help="Recipe JSON, or a shipped recipe name (vits16.json).")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Run directory (default runs/<name>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a dotted key; repeatable.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in the run directory.")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, hidden=True, help="Set by launchers.")
def train_command(
    config_path: str, output_dir: str | None, overrides: tuple[str, ...], resume: bool, local_rank: int | None
) -> None:
    """Train DINO as the recipe says (one process here; the same module is what deepspeed/torchrun launch)."""
    from dino_scale.config import load_config
    from dino_scale.train.loop import train

    all_overrides = list(overrides) + ([f"output_dir={json.dumps(output_dir)}"] if output_dir else [])
    train(load_config(config_path, all_overrides), resume=resume)


def main() -> None:
    train_command(prog_name="python -m dino_scale.train")
