"""DINO training: one loop for every backend.

    python -m dino_scale.train --config configs/vits16.json [--output-dir DIR] [--set key=value ...] [--resume]

The loop reads top to bottom like the method: augment -> teacher sees the globals, student sees all crops ->
centred & sharpened cross-entropy -> student step -> teacher EMA. Everything hardware-specific sits behind
`Backend` (see backends.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import click
import torch
from torch import nn

from dino_scale import checkpoint as ckpt
from dino_scale.augment import MultiCropAugmentation, eval_transform
from dino_scale.backends import Backend, BackendUnavailable, make_backend
from dino_scale.backends.base import sync_batch_norm
from dino_scale.config import BatchPlan, TrainConfig, load_config
from dino_scale.data import count_samples, expand_shards, make_eval_loader, make_train_loader, stable_seed
from dino_scale.knn import extract_features, knn_accuracy
from dino_scale.loss import DINOLoss
from dino_scale.metrics import MetricsWriter, Progress, setup_logging
from dino_scale.models import build_student_teacher, create_backbone, update_teacher
from dino_scale.schedules import build_schedules

log = logging.getLogger("dino_scale")


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf; the message names the step and the quantity. No checkpoint is written after it."""


def _describe_non_finite(step: int, **tensors: torch.Tensor) -> str:
    bad = [name for name, value in tensors.items() if not torch.isfinite(value).all()]
    return f"step {step}: non-finite {', '.join(bad) or 'value'}; stopping (the last checkpoint is untouched)"


@dataclass
class DataPlan:
    urls: list[str]
    samples_per_epoch: int
    global_batch: int
    steps_per_epoch: int


def plan_data(cfg: TrainConfig, batch: BatchPlan, world_size: int) -> DataPlan:
    urls = expand_shards(cfg.data.train_shards)
    samples = cfg.data.samples_per_epoch or count_samples(urls)
    steps = samples // batch.global_batch
    if steps == 0:
        raise ValueError(
            f"data.train_shards={cfg.data.train_shards!r} holds {samples} samples per epoch, fewer than one global "
            f"batch of {batch.global_batch} (micro batch {batch.micro_batch} x accumulation "
            f"{batch.accumulation_steps} x {world_size} processes)"
        )
    return DataPlan(urls, samples, batch.global_batch, steps)


def make_augmentation(cfg: TrainConfig) -> MultiCropAugmentation:
    return MultiCropAugmentation(
        global_size=cfg.data.global_crop_size,
        local_size=cfg.data.local_crop_size,
        n_local=cfg.data.local_crops_number,
        global_scale=tuple(cfg.data.global_crops_scale),
        local_scale=tuple(cfg.data.local_crops_scale),
    )


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(saved: Any, rank: int, world_size: int, seed: int, step: int) -> None:
    """Each rank continues its own RNG stream (drop-path masks). After a change of process count the streams
    cannot continue, so every rank starts a fresh one derived from (seed, step, rank)."""
    per_rank = saved if isinstance(saved, list) else [saved]
    if len(per_rank) == world_size:
        set_rng_state(per_rank[rank])
        return
    log.warning(
        "checkpoint holds RNG states of %d process(es), this run has %d: drop-path masks restart from a fresh seed",
        len(per_rank),
        world_size,
    )
    torch.manual_seed(stable_seed("train-rng", seed, step, rank))


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on a GPU, the resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # POSIX only; the CPU number is informational

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def teacher_digest(teacher: nn.Module) -> str:
    """sha256 over the teacher's parameters and buffers: equal digests on all ranks mean bit-identical replicas."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resume_position(state: dict[str, Any], plan: DataPlan, accumulation: int) -> tuple[int, int]:
    """(epoch, first micro-batch index) to continue from, for this run's batch plan.

    Positions are stored in optimizer steps, so a run may resume on another number of processes as long as the
    global batch (and thus the schedules and the epoch length) is the same.
    """
    position = state["data_position"]
    saved_global = int(position.get("global_batch", plan.global_batch))
    if saved_global != plan.global_batch:
        raise ValueError(
            f"the checkpoint was written with a global batch of {saved_global}, this run has {plan.global_batch}: "
            "the lr schedule and the data position depend on it. Set deepspeed.train_batch_size to "
            f"{saved_global} (accumulation steps then follow the number of processes)"
        )
    if "step_in_epoch" in position:
        return int(position["epoch"]), int(position["step_in_epoch"]) * accumulation
    return int(position["epoch"]), int(position["batch"])  # written before step_in_epoch existed


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) training as the recipe says; returns the final metrics record."""
    backend: Backend = make_backend(cfg)
    # On an error there is no clean-up barrier: other ranks may be stuck in a collective; the launcher stops them.
    record = _train(cfg, backend, resume)
    backend.close()
    return record


def _train(cfg: TrainConfig, backend: Backend, resume: bool) -> dict[str, Any]:
    main_process = backend.is_main_process()
    setup_logging(main_process)
    out_dir = cfg.resolved_output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank

    plan = plan_data(cfg, backend.batch, backend.world_size)
    student, teacher = build_student_teacher(cfg.model)
    if cfg.model.init_backbone:
        weights = ckpt.extract_backbone_state_dict(cfg.model.init_backbone)
        for network in (student, teacher):
            ckpt.load_backbone_weights(network.backbone, weights, source=cfg.model.init_backbone)
        log.info("backbones initialised from %s", cfg.model.init_backbone)
    if cfg.model.grad_checkpointing:
        student.backbone.set_grad_checkpointing(True)
    student_module = backend.prepare(student)
    if backend.world_size > 1:  # the teacher's BatchNorm (if any) sees the global batch too, as in official DINO
        teacher = sync_batch_norm(teacher, backend.device)
    teacher.to(backend.device)
    torch.manual_seed(stable_seed("train-rng", cfg.seed, 0, backend.rank))  # drop-path masks differ per rank
    loss_fn = DINOLoss(cfg.model.out_dim, 2, cfg.dino.student_temp, cfg.dino.center_momentum).to(backend.device)
    schedules = build_schedules(cfg, plan.steps_per_epoch, plan.global_batch)
    augmentation = make_augmentation(cfg)
    accumulation = backend.batch.accumulation_steps
    last_step = min(schedules.total_steps, cfg.max_steps or schedules.total_steps)

    step, skipped_total = 0, 0
    epoch, start_batch = 0, 0
    latest = ckpt.find_latest_checkpoint(out_dir) if resume else None
    if resume and latest is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out_dir)
    if latest is not None:
        state = backend.load(latest)
        teacher.load_state_dict(state["teacher"])
        loss_fn.center.copy_(state["center"])
        step = int(state["step"])
        skipped_total = int(state.get("skipped_samples", 0))
        epoch, start_batch = resume_position(state, plan, accumulation)
        restore_rng(state["rng"], backend.rank, backend.world_size, cfg.seed, step)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", latest, step, epoch, start_batch)
    else:
        # The teacher starts as an exact copy of the student as the backend holds it: with DeepSpeed's bf16 mode
        # that is the fp32 master copy made from the bf16-rounded weights, not the fp32 initialisation.
        update_teacher(teacher, backend.student_weight_groups(), momentum=0.0)
    if main_process:
        ckpt.atomic_write_text(out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        log.info(
            "%s: %d samples/epoch, global batch %d (%d x %d accumulation x %d processes), %d steps/epoch, "
            "%d epochs, device %s, backend %s",
            cfg.name,
            plan.samples_per_epoch,
            plan.global_batch,
            backend.batch.micro_batch,
            accumulation,
            backend.world_size,
            plan.steps_per_epoch,
            cfg.epochs,
            backend.device,
            backend.name,
        )

    def save(at_step: int, at_epoch: int, at_step_in_epoch: int) -> None:
        state = {
            "teacher": teacher.state_dict(),
            "center": loss_fn.center,
            "step": at_step,
            "data_position": {
                "epoch": at_epoch,
                "step_in_epoch": at_step_in_epoch,
                "samples_seen": at_step * plan.global_batch,
                "global_batch": plan.global_batch,
                "world_size": backend.world_size,
            },
            "rng": backend.gather_objects(rng_state()),
            "skipped_samples": skipped_total,
            "backend": backend.name,
            "config": cfg.to_dict(),
        }
        path = backend.save(out_dir, at_step, state, cfg.keep_checkpoints)
        log.info("checkpoint %s", path)

    metrics = MetricsWriter(out_dir / "metrics.jsonl" if main_process else None)
    progress = Progress(last_step, step, enabled=main_process)
    record: dict[str, Any] = {}
    window_start, window_steps, window_loss = time.monotonic(), 0, 0.0
    non_finite_loss = False

    while step < last_step:
        loader = make_train_loader(
            plan.urls,
            augmentation,
            cfg.micro_batch_size,
            plan.steps_per_epoch * accumulation,
            epoch,
            cfg.seed,
            start_batch=start_batch,
            num_workers=cfg.data.num_workers,
            rank=backend.rank,
            world_size=backend.world_size,
            shuffle_buffer=cfg.data.shuffle_buffer,
            pin_memory=backend.device.type == "cuda",
        )
        for batch_index, batch in enumerate(loader, start=start_batch):
            if batch.skipped:
                skipped_total += len(batch.skipped)
                log.warning("skipped %d unreadable sample(s): %s", len(batch.skipped), ", ".join(batch.skipped))
            views = augmentation.to_model_input(batch.views, backend.device)
            last_micro_batch = (batch_index + 1) % accumulation == 0
            with backend.forward_context(sync_gradients=last_micro_batch):
                teacher_output = teacher(views[:2])  # the teacher sees the two global crops only
                student_output = student_module(views)
            loss, stats = loss_fn(student_output, teacher_output, float(schedules.teacher_temp[step]))
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                # Every rank must learn of it at the same point, or the others would wait in a collective forever.
                non_finite_loss = True
                bad = _describe_non_finite(
                    step, student_output=student_output, teacher_output=teacher_output, center=loss_fn.center, loss=loss
                )
            backend.backward(loss / accumulation, sync_gradients=last_micro_batch)
            window_loss += loss_value / accumulation
            if not last_micro_batch:
                continue

            if backend.distributed:
                flag = torch.tensor([float(non_finite_loss)], device=backend.device)
                torch.distributed.all_reduce(flag)
                if flag.item() and not non_finite_loss:
                    non_finite_loss, bad = True, f"step {step}: non-finite loss on another rank; stopping"
            if non_finite_loss:
                raise NonFiniteError(bad)
            loss_fn.update_center()
            epoch_progress = step / plan.steps_per_epoch
            grad_norm = backend.optimizer_step(
                float(schedules.lr[step]),
                float(schedules.weight_decay[step]),
                freeze_last_layer=epoch_progress < cfg.optim.freeze_last_layer,
            )
            if not cfg.fp16 and not torch.isfinite(grad_norm):
                raise NonFiniteError(_describe_non_finite(step, gradient_norm=grad_norm))
            update_teacher(teacher, backend.student_weight_groups(), float(schedules.momentum[step]))
            step += 1
            window_steps += 1

            if step % cfg.log_every == 0 or step == last_step:
                elapsed = time.monotonic() - window_start
                # Means over ranks: every rank saw other samples (one small collective per logged step).
                window_mean_loss = torch.tensor(window_loss / window_steps, device=backend.device)
                loss_mean, entropy_mean, kl_mean = backend.mean_over_ranks(
                    torch.stack([window_mean_loss, stats.teacher_entropy, stats.kl]).float()
                ).tolist()
                images_per_s = window_steps * plan.global_batch / max(elapsed, 1e-9)
                peak_memory = backend.gather_objects(round(peak_memory_gb(backend.device), 3))
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss_mean,
                    "lr": float(schedules.lr[step - 1]),
                    "wd": float(schedules.weight_decay[step - 1]),
                    "momentum": float(schedules.momentum[step - 1]),
                    "teacher_temp": float(schedules.teacher_temp[step - 1]),
                    "teacher_entropy": entropy_mean,
                    "kl": kl_mean,
                    "grad_norm": grad_norm.item(),
                    "images_per_s": images_per_s,
                    "images_per_s_per_device": images_per_s / backend.world_size,
                    "step_time_s": elapsed / window_steps,
                    "peak_memory_gb": max(peak_memory),
                    "peak_memory_gb_per_rank": peak_memory,
                    "skipped_samples": skipped_total,
                }
                metrics.write(record)
                progress.update(window_steps, record)
                window_start, window_steps, window_loss = time.monotonic(), 0, 0.0

            at_epoch_end = (batch_index + 1) == plan.steps_per_epoch * accumulation
            position = (epoch + 1, 0) if at_epoch_end else (epoch, (batch_index + 1) // accumulation)
            if step % cfg.checkpoint_every == 0 or step == last_step:
                save(step, *position)
            if step >= last_step:
                break
        epoch, start_batch = epoch + 1, 0

    progress.close()
    # The EMA must have left the teacher bit-identical on every rank; say so, with evidence, in the metrics.
    digests = backend.gather_objects(teacher_digest(teacher))
    if len(set(digests)) != 1:
        log.error("teacher replicas differ across ranks: %s", digests)
    if main_process:
        ckpt.save_safetensors(
            {k: v.detach().cpu() for k, v in teacher.backbone.state_dict().items()},
            out_dir / "teacher_backbone.safetensors",
            metadata={
                "arch": cfg.model.arch,
                "timm_kwargs": json.dumps(cfg.model.timm_kwargs),
                "step": str(step),
            },
        )
        record = {**record, "teacher_sha256_per_rank": digests}
        metrics.write({"step": step, "event": "final", "teacher_sha256_per_rank": digests})
        final_eval = evaluate_knn_vs_random(cfg, teacher.backbone, backend.device)
        if final_eval:
            record = {**record, **final_eval}
            metrics.write({"step": step, "event": "final_knn", **final_eval})
            ckpt.atomic_write_text(out_dir / "knn.json", json.dumps(final_eval, indent=2) + "\n")
    metrics.close()
    return record


def evaluate_knn_vs_random(cfg: TrainConfig, backbone: nn.Module, device: torch.device) -> dict[str, float]:
    """k-NN top-1 of the trained backbone next to a randomly initialised one of the same architecture."""
    ev = cfg.eval
    if not (ev.knn_train_shards and ev.knn_val_shards):
        return {}
    transform = eval_transform(ev.image_size)
    train_urls, val_urls = expand_shards(ev.knn_train_shards), expand_shards(ev.knn_val_shards)

    def top1(model: nn.Module) -> float:
        model = model.to(device)
        train_features, train_labels = extract_features(
            model, make_eval_loader(train_urls, transform, ev.batch_size, cfg.data.num_workers), device
        )
        val_features, val_labels = extract_features(
            model, make_eval_loader(val_urls, transform, ev.batch_size, cfg.data.num_workers), device
        )
        return knn_accuracy(train_features, train_labels, val_features, val_labels, ev.knn_k, ev.knn_temperature)[
            "top1"
        ]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        random_backbone = create_backbone(cfg.model.arch, 0.0, **cfg.model.timm_kwargs)
    result = {"knn_top1_teacher": top1(backbone), "knn_top1_random_init": top1(random_backbone)}
    log.info(
        "k-NN top-1 on %s (k=%d): trained teacher %.1f%%  vs  random init %.1f%%",
        ev.knn_val_shards,
        ev.knn_k,
        result["knn_top1_teacher"],
        result["knn_top1_random_init"],
    )
    print(
        f"k-NN top-1 (k={ev.knn_k}) on held-out {ev.knn_val_shards}: "
        f"trained teacher {result['knn_top1_teacher']:.1f}% | random init {result['knn_top1_random_init']:.1f}%",
        flush=True,
    )
    return result


@click.command("train", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, help="Recipe JSON, or a shipped recipe name (vits16.json).")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Run directory (default runs/<name>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a dotted key; repeatable.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in the run directory.")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, hidden=True, help="Set by launchers.")
def train_command(
    config_path: str, output_dir: str | None, overrides: tuple[str, ...], resume: bool, local_rank: int | None
) -> None:
    """Train DINO as the recipe says (one process here; the same module is what deepspeed/torchrun launch)."""
    from dino_scale.config import ConfigError

    all_overrides = list(overrides) + ([f"output_dir={json.dumps(output_dir)}"] if output_dir else [])
    try:
        cfg = load_config(config_path, all_overrides)
        train(cfg, resume=resume)
    except (
        ConfigError,
        FileNotFoundError,
        ValueError,
        BackendUnavailable,
        NonFiniteError,
        ckpt.CheckpointError,
    ) as error:
        raise click.ClickException(str(error)) from None


def main() -> None:
    train_command(prog_name="python -m dino_scale.train")


if __name__ == "__main__":
    main()
