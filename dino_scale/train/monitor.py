"""The collapse monitor: DINO's two failure modes, told apart by the teacher's entropy and the teacher-student KL.

    H(P_t)            mean entropy of the teacher's output distribution; log K when P_t is uniform, 0 when one of
                      the K dimensions takes all the mass
    KL(P_t || P_s)    = cross-entropy - H(P_t); 0 when the student matches the teacher trivially

Sharpening without centering collapses to one dimension (H -> 0); centering without sharpening collapses to the
uniform distribution (H -> log K); both end with KL -> 0 (the paper's figure 7). The monitor judges the figures of
each log step (already on the host, averaged over ranks, so every rank reaches the same verdict at the same step);
a sign that holds at every log step for `patience_steps` optimizer steps warns once, or stops the run.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from dino_scale.config import MonitorConfig
from dino_scale.errors import CollapseError

log = logging.getLogger("dino_scale")


class CollapseMonitor:
    def __init__(self, cfg: MonitorConfig, out_dim: int) -> None:
        self.cfg = cfg
        self.max_entropy = math.log(out_dim)
        self._since: dict[str, int] = {}  # collapse sign -> first log step where it held (without a break since)
        self._warned: set[str] = set()

    def signs(self, entropy: float, kl: float) -> dict[str, str]:
        """The collapse signs these figures show, each with its one-line explanation."""
        found = {}
        share = entropy / self.max_entropy
        if share < self.cfg.low_entropy:
            found["one dimension"] = (
                f"H(P_t) = {entropy:.4f} nats, {share:.1%} of log K = {self.max_entropy:.3f} "
                f"(below monitor.low_entropy = {self.cfg.low_entropy:.0%}): one dimension dominates"
            )
        if share > self.cfg.high_entropy:
            found["uniform"] = (
                f"H(P_t) = {entropy:.4f} nats, {share:.1%} of log K = {self.max_entropy:.3f} "
                f"(above monitor.high_entropy = {self.cfg.high_entropy:.0%}): the teacher's output is uniform"
            )
        if kl < self.cfg.low_kl:
            found["no signal"] = (
                f"KL(P_t || P_s) = {kl:.2e} nats (below monitor.low_kl = {self.cfg.low_kl:g}): the student matches "
                "the teacher trivially"
            )
        return found

    def observe(self, record: dict[str, Any] | None) -> None:
        """Judge one log step's record (None between log steps); warns or raises CollapseError as configured."""
        if record is None or self.cfg.collapse == "off":
            return
        step = int(record["step"])
        found = self.signs(float(record["teacher_entropy"]), float(record["kl"]))
        for sign in list(self._since):
            if sign not in found:  # recovered: forget it, and warn again if it comes back
                del self._since[sign]
                self._warned.discard(sign)
        for sign, explanation in found.items():
            since = self._since.setdefault(sign, step)
            if step - since < self.cfg.patience_steps or sign in self._warned:
                continue
            message = (
                f"step {step}: the teacher looks collapsed ({sign}) since step {since}: {explanation}. "
                "Check the centering (dino.center_momentum < 1) and sharpening (dino.teacher_temp below "
                "dino.student_temp); see the README's failure behaviour"
            )
            if self.cfg.collapse == "stop":
                raise CollapseError(message + "; stopping (monitor.collapse = stop)")
            log.warning("%s (monitor.collapse = warn: training goes on)", message)
            self._warned.add(sign)
