"""Machine-readable metrics (JSONL, always) and human progress (a bar on a terminal, log lines otherwise)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("dino_scale")


class MetricsWriter:
    """Appends one JSON object per line and flushes it, so `tail -f` and crash forensics see every record."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Progress:
    """A tqdm bar (rate, ETA) when stderr is a terminal; otherwise a log line per update with the same numbers.

    `update` is called once per logged step with the number of steps advanced and the current metrics.
    """

    def __init__(self, total: int, initial: int, enabled: bool = True) -> None:
        self.total = total
        self.done = initial
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.start_time = time.monotonic()
        self.start_step = initial
        self._bar = (
            tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)
            if self.interactive
            else None
        )

    def update(self, steps: int, metrics: dict[str, Any]) -> None:
        self.done += steps
        if not self.enabled:
            return
        summary = {
            "loss": f"{metrics['loss']:.4f}",
            "img/s": f"{metrics['images_per_s']:.1f}",
            "H(Pt)": f"{metrics['teacher_entropy']:.3f}",
            "KL": f"{metrics['kl']:.4f}",
        }
        if self._bar is not None:
            self._bar.update(steps)
            self._bar.set_postfix(summary, refresh=False)
            return
        elapsed = time.monotonic() - self.start_time
        rate = (self.done - self.start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        fields = " ".join(f"{key}={value}" for key, value in summary.items())
        log.info("step %d/%d epoch %d %s eta=%s", self.done, self.total, metrics["epoch"], fields, _hms(eta))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _hms(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def setup_logging(main_process: bool) -> None:
    """INFO on the main process, warnings only on the others, so N ranks don't print N copies."""
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
