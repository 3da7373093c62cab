"""The `train` command: `python -m dino_scale.train`, `dino-scale train`, and what deepspeed / torchrun launch.

Only click is imported here, so that `dino-scale --help` stays fast; the training code loads when the command runs.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from dino_scale.command import Command


@click.command("train", cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, help="Recipe JSON, or a shipped recipe name (vits16.json).")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Run directory (default runs/<name>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a dotted key; repeatable.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in the run directory.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in the run directory (its files only).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Overrides the recipe's device.")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads per process [default: cores shared out].")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, hidden=True, help="Set by launchers.")
def train_command(
    config_path: str,
    output_dir: str | None,
    overrides: tuple[str, ...],
    resume: bool,
    overwrite: bool,
    device: str | None,
    threads: int | None,
    local_rank: int | None,
) -> None:
    """Train DINO as the recipe says (one process here; the same module is what deepspeed/torchrun launch).

    A fresh run needs an empty run directory (or --overwrite); --resume continues one. SIGTERM, SIGINT (Ctrl-C) and
    SIGUSR1 stop after the current step with a checkpoint and exit status 75, for a job script to requeue."""
    from dino_scale.config import load_config
    from dino_scale.train.loop import train

    flags = {"output_dir": output_dir, "device": device, "threads": threads}
    all_overrides = list(overrides) + [f"{key}={json.dumps(value)}" for key, value in flags.items() if value]
    cfg = load_config(config_path, all_overrides)
    try:
        train(cfg, resume=resume, overwrite=overwrite)
    except RuntimeError as error:
        if not lost_a_peer(error):
            raise
        from dino_scale import run_dir as layout
        from dino_scale.errors import PeerLost

        latest = layout.find_latest_checkpoint(cfg.resolved_output_dir())
        where = f"the last checkpoint is {latest}; resume with --resume" if latest else "no checkpoint was written yet"
        raise PeerLost(
            f"another process of this job stopped (see its log): {str(error).splitlines()[0][:200]}; {where}"
        ) from None


# What gloo and NCCL say when the process at the other end of a collective is gone.
_PEER_LOST = (
    "closed by peer",
    "reset by peer",
    "broken pipe",
    "nccl communicator was aborted",
    "remote process exited",
)


def lost_a_peer(error: BaseException) -> bool:
    """Whether a collective failed because another process of the job died (not a bug of this one)."""
    text = str(error).lower()
    return any(sign in text for sign in _PEER_LOST)


def leave_gloo_job(code: int | str | None) -> None:
    """End this process now with ``code`` (a SystemExit's) if it is a rank of a multi-process CPU (gloo) job, its
    logs and streams flushed first, skipping the interpreter's teardown; otherwise return.

    Why: at interpreter exit gloo's threads race the static destructors, and a rank whose run was complete, with
    everything written, can abort ("terminate called without an active exception", exit -6), which fails the job.
    Seen with and without destroy_process_group: 2 of 16 preempted two-process runs, once in a CI run of the
    two-process FSDP test, once of the two-process ZeRO-2 kill-and-resume test. Nothing is left to do by then: the
    loop has closed its metrics and TensorBoard files and checkpoints are written atomically, so ``os._exit`` loses
    nothing."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group (and no import just to ask)
    if dist is None or not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
        return
    if isinstance(code, str):  # what sys.exit prints for a message
        print(code, file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def run_leaving_gloo_job(command: click.Command, prog_name: str | None = None) -> None:
    """Run a click ``command`` as a program (click ends it with SystemExit, success or not); a rank of a gloo job then
    leaves through :func:`leave_gloo_job`. The entry point of every launch form: ``python|deepspeed|torchrun -m
    dino_scale.train`` and the ``dino-scale`` program (``torchrun --no-python dino-scale train``)."""
    try:
        command(prog_name=prog_name)
    except SystemExit as end:
        leave_gloo_job(end.code)
        raise


def main() -> None:
    run_leaving_gloo_job(train_command, "python -m dino_scale.train")
