"""Progress of long jobs for people: a tqdm bar (rate, ETA) on a terminal, a log line now and then otherwise.

Machine-readable records are the jobs' own business (metrics.jsonl, index_log.jsonl); this is the human view.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """H:MM:SS, or ? for an unknown (infinite) duration."""
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts ``unit`` s towards ``total``. On a terminal: a tqdm bar with rate and ETA, plus the latest ``postfix``
    values. Otherwise: a log line with the same numbers, at most every ``interval`` seconds (0: every update)."""

    def __init__(self, total: int, unit: str, initial: int = 0, enabled: bool = True, interval: float = 0.0) -> None:
        self.total, self.unit = total, unit
        self.done = self.start_done = initial
        self.enabled, self.interval = enabled, interval
        self.start = self.last_log = time.monotonic()
        self._bar = (
            tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, file=sys.stderr)
            if enabled and sys.stderr.isatty()
            else None
        )

    @property
    def rate(self) -> float:
        """Units per second since this meter started."""
        elapsed = time.monotonic() - self.start
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def update(self, count: int, postfix: dict[str, Any] | None = None) -> None:
        self.done += count
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(count)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            return
        now = time.monotonic()
        if now - self.last_log < self.interval:
            return
        self.last_log = now
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        fields = "".join(f" {key}={value}" for key, value in (postfix or {}).items())
        eta_text = format_duration(eta)
        log.info("%s %d/%d, %.1f %s/s, eta %s%s", self.unit, self.done, self.total, rate, self.unit, eta_text, fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
