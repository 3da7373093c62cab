"""Preemption: SIGTERM, SIGINT and SIGUSR1 stop a run at its next log step, with a checkpoint.

A cluster scheduler (SLURM's `--signal`, Kubernetes, spot-instance notices) or a user's Ctrl-C asks the process to
stop. Exiting at once would lose up to `checkpoint_every` steps; instead the signal only sets a flag. The loop hands
the flag to the backend together with the step's non-finite flags, which it already reduces over all ranks once per
optimizer step (no extra collective) and reads at log steps (no extra host read), so every rank sees the request at
the same step even when the signal reached only one of them. Then every rank writes its part of a checkpoint and the
command exits with
errors.PREEMPTED_EXIT_STATUS (75), which a job script can requeue; `--resume` continues bit for bit.

A second signal while the first is pending stops at once (Ctrl-C twice), as the process would without this module.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

import torch

log = logging.getLogger("dino_scale")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class PreemptionSignals:
    """Catches STOP_SIGNALS while installed (a context manager), and remembers the first one received."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> PreemptionSignals:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
                # The signal may land on any thread, e.g. one of gloo's in the middle of a socket read: restart such
                # system calls instead of failing them with EINTR (Python's own handling happens in the main thread).
                signal.siginterrupt(signum, False)
        return self

    def __exit__(self, *_: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            # A DataLoader worker forked from this process inherits the handler; the process group's Ctrl-C reaches
            # the workers too. They go on producing batches until the training process stops them.
            return
        if self.received is not None:
            log.warning("%s again: stopping now, without a checkpoint", signal.Signals(signum).name)
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)  # the default action of the restored handler
            return
        self.received = signum
        log.warning(
            "%s received: finishing the current optimizer step, then writing a checkpoint and stopping "
            "(send it again to stop at once)",
            signal.Signals(signum).name,
        )

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def flag(self) -> torch.Tensor:
        """This process's request as a 0-dim bool tensor, to be reduced with the step's non-finite flags."""
        return torch.tensor(self.received is not None)
