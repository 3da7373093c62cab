"""DINO training: one loop for every backend, top to bottom like the method.

Per optimizer step: the teacher sees the two global crops and the student all crops -> centred, sharpened
cross-entropy -> backward (accumulated over micro-batches) -> student step -> teacher EMA -> log -> checkpoint.
Everything hardware-specific sits behind `Backend` (backends/base.py): the loop never calls a collective itself and
never asks which backend it has. Between log and checkpoint steps nothing is read back from the device (no host
synchronisation): the loss is summed there, and a non-finite step is dropped there (the fused optimizer skips it,
the center and teacher keep their values) and judged at the next log step (TrainState.settle)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from dino_scale import run_dir as layout
from dino_scale.config import TrainConfig
from dino_scale.data.augment import MultiCropAugmentation
from dino_scale.data.folders import survey_image_folder
from dino_scale.data.loaders import TrainBatch, make_train_loader, renders_on_device, stable_seed
from dino_scale.data.shards import expand_shards, survey_shards
from dino_scale.devices import CPU_KERNELS, autocast_is_emulated, set_threads
from dino_scale.errors import PREEMPTED_EXIT_STATUS, ConfigError, Preempted, blame
from dino_scale.io import atomic_write_json, save_safetensors
from dino_scale.models.backbones import fused_attention_layers
from dino_scale.models.dino import MultiCropWrapper, build_student_teacher
from dino_scale.models.weights import IMAGE_SIZE_METADATA_KEY, extract_backbone_state_dict, load_backbone_weights
from dino_scale.train.backends import Backend, make_backend
from dino_scale.train.backends.base import STOP_REQUESTED
from dino_scale.train.ema import teacher_digest, update_teacher
from dino_scale.train.evaluation import knn_vs_random_init
from dino_scale.train.inputs import KnnSets, check_run_dir, clear_run_dir, list_knn_sets, log_changes
from dino_scale.train.loss import DINOLoss
from dino_scale.train.metrics import NonFiniteWatch, StepMetrics, setup_logging
from dino_scale.train.monitor import CollapseMonitor
from dino_scale.train.preemption import PreemptionSignals
from dino_scale.train.schedules import build_schedules
from dino_scale.train.state import DataPlan, TrainState

log = logging.getLogger("dino_scale")


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) training as the recipe says; returns the last step's metrics record plus the final ones.

    A fresh run refuses a run directory that holds another run unless `overwrite` (which removes that run's files);
    `resume` continues it. SIGTERM / SIGINT / SIGUSR1 end the run at the next log step with a checkpoint
    (errors.Preempted)."""
    run_dir = cfg.resolved_output_dir()
    changes = check_run_dir(cfg, resume, overwrite)  # every input is checked before the first step
    knn_sets = list_knn_sets(cfg)
    threads = set_threads(cfg.threads, cfg.data.num_workers, processes=local_processes())
    backend = make_backend(cfg)
    setup_logging(backend.is_main_process())
    log_changes(changes)
    augmentation = make_augmentation(cfg)  # with data.view_kernel=c, an unbuildable kernel stops the run here
    if overwrite and backend.is_main_process():
        clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_data(cfg, backend)
    student, teacher = build_networks(cfg, backend)
    loss_fn = DINOLoss(cfg.model.out_dim, 2, cfg.dino.student_temp, cfg.dino.center_momentum, backend.sum_over_ranks)
    loss_fn.to(backend.device)
    schedules = build_schedules(cfg, plan.steps_per_epoch, plan.global_batch)
    state = TrainState(cfg, backend, teacher, loss_fn, plan)
    if not (resume and state.resume(run_dir)):
        # The teacher starts as an exact copy of the student as the backend holds it: with DeepSpeed's bf16 mode
        # that is the fp32 master copy made from the bf16-rounded weights, not the fp32 initialisation.
        update_teacher(teacher, backend.student_weight_groups(), momentum=0.0)
    announce(cfg, backend, plan, run_dir, threads)
    last_step = min(schedules.total_steps, cfg.max_steps or schedules.total_steps)
    metrics = StepMetrics(
        run_dir / layout.METRICS_FILE, backend, schedules, plan.global_batch, last_step, state.step, cfg.log_every
    )
    if changes is not None and (changes.hyperparameters or changes.run_control):
        metrics.event(state.step, "resumed_with_changes", **asdict(changes))
    non_finite = NonFiniteWatch()
    collapse = CollapseMonitor(cfg.monitor, cfg.model.out_dim)
    accumulation = backend.batch.accumulation_steps

    with PreemptionSignals() as signals:
        while state.step < last_step:
            epoch = state.epoch
            batches = epoch_batches(cfg, plan, backend, augmentation, state)
            for micro_batch, batch in enumerate(batches, start=state.first_micro_batch):
                state.count_skipped(batch.skipped, batch.skipped_shards)
                views = augmentation.to_model_input(batch, backend.device)  # rendered here if the workers did not
                last_micro_batch = (micro_batch + 1) % accumulation == 0
                with backend.forward_context(sync_gradients=last_micro_batch):
                    teacher_output = teacher(views[:2])  # the teacher sees the two global crops only
                    student_output = student(views)
                loss, stats = loss_fn(student_output, teacher_output, float(schedules.teacher_temp[state.step]))
                backend.backward(loss / accumulation, sync_gradients=last_micro_batch)
                metrics.add_micro_batch(loss, accumulation)
                non_finite.observe(
                    student_output=student_output, teacher_output=teacher_output, center=loss_fn.center, loss=loss
                )
                if not last_micro_batch:
                    continue

                step = state.step
                result = backend.optimizer_step(  # updates nothing when this step went non-finite on any rank
                    float(schedules.lr[step]),
                    float(schedules.weight_decay[step]),
                    freeze_last_layer=step / plan.steps_per_epoch < cfg.optim.freeze_last_layer,
                    flags={**non_finite.take(), STOP_REQUESTED: signals.flag()},  # one collective for all flags
                )
                # A dropped step leaves the center and the teacher as they were, decided on the device.
                loss_fn.update_center(result.applied)
                update_teacher(
                    teacher, backend.student_weight_groups(), float(schedules.momentum[step]), result.applied
                )
                state.finish_step(result, last_step)  # reads the verdicts at log / checkpoint steps: may stop the run
                record = metrics.step_done(
                    state.step, epoch, stats, result.grad_norm, state.counts(), state.skipped_steps
                )
                if record is not None:
                    state.check_skipped_fraction(record)
                    collapse.observe(record)
                saved = state.checkpoint_due(last_step)
                if saved:
                    state.save(run_dir)
                if state.step >= last_step:
                    break
                if backend.stop_requested:  # a signal reached some rank: every rank stops at this step
                    stop_preempted(backend, state, metrics, run_dir, signals.name, saved)

    record = finish(cfg, backend, teacher, state.step, metrics, run_dir, knn_sets)
    backend.close()  # on an error there is no clean-up barrier: other ranks may be stuck; the launcher stops them
    return record


def local_processes() -> int:
    """Training processes on this machine: torchrun says so in LOCAL_WORLD_SIZE, the deepspeed launcher in
    LOCAL_SIZE; else one."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def stop_preempted(
    backend: Backend, state: TrainState, metrics: StepMetrics, run_dir: Path, signal_name: str, saved: bool
) -> NoReturn:
    """Checkpoint (unless this step's is already written) on every rank, close the logs, and raise Preempted."""
    if not saved:
        state.save(run_dir)
    checkpoint = layout.find_latest_checkpoint(run_dir)
    metrics.event(state.step, "preempted", signal=signal_name, checkpoint=str(checkpoint))
    metrics.progress.close()
    metrics.close()
    # Every rank's part of the checkpoint is written; the process exits next, which releases the process group (its
    # destroy made a signalled rank 1 abort at exit in gloo's teardown in 2 of 16 tries; 0 of 22 without), a gloo rank
    # without the interpreter's teardown (dino_scale.train.command.leave_gloo_job).
    backend.barrier()
    raise Preempted(
        f"stopped by {signal_name} after step {state.step}: checkpoint {checkpoint}; continue with --resume "
        f"(exit status {PREEMPTED_EXIT_STATUS})"
    )


# The schedules hold one value per optimizer step (four float64 arrays, as official DINO's): 10^7 steps is 320 MB and
# ten times the official ViT-S/16 800-epoch run; more means a recipe or shards.json error, caught before allocating.
MAX_TOTAL_STEPS = 10**7


def plan_data(cfg: TrainConfig, backend: Backend) -> DataPlan:
    """The usable training shards (damaged ones left out, with a warning each) and the epoch length in optimizer
    steps (from data.samples_per_epoch, or the shards' counts)."""
    source_key = "data.train_images" if cfg.data.train_images is not None else "data.train_shards"
    with blame(source_key):
        if cfg.data.train_images is not None:
            survey = survey_image_folder(cfg.data.train_images)
        else:
            assert cfg.data.train_shards is not None  # the recipe's validation says one of the two is set
            survey = survey_shards(expand_shards(cfg.data.train_shards))
    samples = cfg.data.samples_per_epoch or survey.samples
    batch = backend.batch
    steps = samples // batch.global_batch
    if steps == 0:
        raise ConfigError(
            f"{source_key}={getattr(cfg.data, source_key.split('.')[1])!r} holds {samples} samples per epoch, fewer "
            "than one global "
            f"batch of {batch.global_batch} (micro batch {batch.micro_batch} x accumulation "
            f"{batch.accumulation_steps} x {backend.world_size} processes)"
        )
    if steps * cfg.epochs > MAX_TOTAL_STEPS:
        source = "data.samples_per_epoch" if cfg.data.samples_per_epoch else "the shards (shards.json or a scan)"
        raise ConfigError(
            f"epochs={cfg.epochs} x {steps} steps per epoch ({samples} samples from {source} / global batch "
            f"{batch.global_batch}) is {steps * cfg.epochs} optimizer steps, more than {MAX_TOTAL_STEPS}; check "
            "epochs and the sample count"
        )
    return DataPlan(survey.urls, samples, batch.global_batch, steps, skipped_shards=len(survey.skipped))


def build_networks(cfg: TrainConfig, backend: Backend) -> tuple[nn.Module, nn.Module]:
    """(the student as the backend runs it, the teacher on this process's device): the same initial weights on every
    rank, then a per-rank RNG stream for the drop-path masks."""
    torch.manual_seed(cfg.seed)
    with blame("model.arch"):
        student, teacher = build_student_teacher(cfg.model)
    if cfg.model.init_backbone:
        with blame("model.init_backbone"):
            weights = extract_backbone_state_dict(cfg.model.init_backbone)
            for network in (student, teacher):
                load_backbone_weights(network.backbone, weights, source=cfg.model.init_backbone)
        log.info("backbones initialised from %s", cfg.model.init_backbone)
    if cfg.model.grad_checkpointing:
        student.backbone.set_grad_checkpointing(True)
    if cfg.model.compile:
        compile_backbones(cfg, student, teacher)
    fused, layers = fused_attention_layers(student.backbone)
    if fused < layers:
        log.warning(
            "attention: %d of %d layers run without torch's fused SDPA (TIMM_FUSED_ATTN=0?)", layers - fused, layers
        )
    elif layers:
        log.info("attention: torch's fused scaled_dot_product_attention in all %d layers", layers)
    if autocast_is_emulated(backend.device, cfg.autocast_dtype):
        log.warning(
            "precision: %s on this CPU is emulated (no %s) and slower than fp32; set the recipe's deepspeed "
            "precision block (torch_autocast, bf16 or fp16) to enabled=false to train in fp32",
            cfg.autocast_dtype,
            CPU_KERNELS[cfg.autocast_dtype][1],
        )
    student_module = backend.prepare(student)
    teacher = backend.prepare_teacher(teacher)
    torch.manual_seed(stable_seed("train-rng", cfg.seed, 0, backend.rank))  # drop-path masks differ per rank
    return student_module, teacher


def compile_backbones(cfg: TrainConfig, *networks: MultiCropWrapper) -> None:
    """torch.compile each network's backbone (MultiCropWrapper.compile_backbone: static shapes, one graph per crop
    resolution and grad mode -- student globals, student locals, teacher globals -- compiled in the first step, none
    after it). The heads stay eager: a handful of matmuls."""
    for network in networks:
        network.compile_backbone(cfg.model.compile_backend)
    log.info("backbones compiled with torch.compile (backend %s, static shapes)", cfg.model.compile_backend)


def make_augmentation(cfg: TrainConfig) -> MultiCropAugmentation:
    return MultiCropAugmentation(
        global_size=cfg.data.global_crop_size,
        local_size=cfg.data.local_crop_size,
        n_local=cfg.data.local_crops_number,
        global_scale=tuple(cfg.data.global_crops_scale),
        local_scale=tuple(cfg.data.local_crops_scale),
        view_kernel=cfg.data.view_kernel,
    )


def epoch_batches(
    cfg: TrainConfig, plan: DataPlan, backend: Backend, augmentation: MultiCropAugmentation, state: TrainState
) -> Iterable[TrainBatch]:
    """This process's micro-batches of the state's epoch, from where the state stands in it."""
    render_on_device = renders_on_device(cfg.data.augment_on, backend.device)
    return make_train_loader(
        plan.urls,
        augmentation,
        cfg.micro_batch_size,
        plan.steps_per_epoch * backend.batch.accumulation_steps,
        state.epoch,
        cfg.seed,
        start_batch=state.first_micro_batch,
        num_workers=cfg.data.num_workers,
        rank=backend.rank,
        world_size=backend.world_size,
        shuffle_buffer=cfg.data.shuffle_buffer,
        pin_memory=backend.device.type == "cuda",
        render_on_device=render_on_device,
        decode_reduced=cfg.data.decode_reduced,
        decode_on_device=render_on_device and cfg.data.decode_on == "device",
    )


def announce(cfg: TrainConfig, backend: Backend, plan: DataPlan, run_dir: Path, threads: int) -> None:
    """Write the resolved recipe into the run directory and say what will run (main process)."""
    if not backend.is_main_process():
        return
    atomic_write_json(run_dir / layout.CONFIG_FILE, cfg.to_dict())
    batch = backend.batch
    log.info(
        "%s: %d samples/epoch, global batch %d (%d x %d accumulation x %d processes), %d steps/epoch, "
        "%d epochs, device %s, backend %s, %d intra-op thread(s) + %d data worker(s) per process",
        cfg.name,
        plan.samples_per_epoch,
        plan.global_batch,
        batch.micro_batch,
        batch.accumulation_steps,
        backend.world_size,
        plan.steps_per_epoch,
        cfg.epochs,
        backend.device,
        backend.name,
        threads,
        cfg.data.num_workers,
    )


def finish(
    cfg: TrainConfig,
    backend: Backend,
    teacher: nn.Module,
    step: int,
    metrics: StepMetrics,
    run_dir: Path,
    knn_sets: KnnSets | None,
) -> dict[str, Any]:
    """Prove the teacher replicas identical, write the teacher backbone and the final records, run the final k-NN."""
    metrics.progress.close()
    digests = backend.gather_objects(teacher_digest(teacher))
    if len(set(digests)) != 1:
        log.error("teacher replicas differ across ranks: %s", digests)
    record = dict(metrics.last_record)
    if backend.is_main_process():
        save_safetensors(
            {k: v.detach().cpu() for k, v in teacher.backbone.state_dict().items()},
            run_dir / layout.TEACHER_BACKBONE_FILE,
            metadata={
                "arch": cfg.model.arch,
                "timm_kwargs": json.dumps(cfg.model.timm_kwargs),
                "pos_embed_interpolation": cfg.model.pos_embed_interpolation,
                IMAGE_SIZE_METADATA_KEY: str(cfg.data.global_crop_size),  # every command's default input size
                "step": str(step),
            },
        )
        record["teacher_sha256_per_rank"] = digests
        metrics.event(step, "final", teacher_sha256_per_rank=digests)
        final_knn = knn_vs_random_init(cfg, teacher.backbone, backend.device, knn_sets)
        if final_knn:
            record.update(final_knn)
            metrics.event(step, "final_knn", **final_knn)
            atomic_write_json(run_dir / layout.KNN_FILE, final_knn)
    metrics.close()
    return record
