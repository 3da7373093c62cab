"""Which torch device a command or a training process runs on."""

from __future__ import annotations

import os

import torch

from dino_scale.errors import InputError, Unavailable


def resolve_device(requested: str, local_rank: int | None = None) -> torch.device:
    """``auto`` (the GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    With ``local_rank`` (a training process started by a launcher) CUDA means this process's GPU, ``cuda:local_rank``,
    which is also made the current device.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise Unavailable(f"device {requested!r} was asked for, but torch sees no CUDA GPU here", argument="device")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise InputError(f"device {requested!r} is not one of auto, cpu, cuda, cuda:N", argument="device") from None
    if device.type == "cuda" and local_rank is not None:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    return device


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask under SLURM / taskset / containers, else all)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS, Windows
        return max(os.cpu_count() or 1, 1)


def set_threads(requested: int | None, workers: int = 0, processes: int = 1) -> int:
    """Set this process's intra-op threads (torch.set_num_threads) and return the number set.

    ``requested`` wins when given. Otherwise the cores are shared out so that nothing oversubscribes them: the
    ``processes`` training processes on this machine each get ``cores / processes`` cores, from which their
    ``workers`` DataLoader workers take one each (every worker runs one thread, see :func:`one_thread_worker`), and
    the rest (at least one) go to the process's own intra-op threads. Why: on a 2-core machine under load, a training
    process with torch's default of 2 intra-op threads plus 2 DataLoader workers ran 6-17 img/s, with one thread each
    50-105 img/s (identical losses); a plain timm forward ran 9.9 against 353 img/s.
    """
    if requested is None:
        share = max(available_cores() // max(processes, 1), 1)
        requested = max(share - max(workers, 0), 1)
    torch.set_num_threads(requested)
    return requested


def one_thread_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a data worker decodes and augments one sample at a time on one thread; more
    threads per worker only contend with the training process and the other workers for the same cores."""
    torch.set_num_threads(1)
