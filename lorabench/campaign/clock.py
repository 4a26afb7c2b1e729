"""The campaign's clock: stage deadlines inside one time budget, and whether a job may still start.

The budget counts from the device command's start (``started_at``: wheels, environment and planning are
inside it). Stage k may run until ``budget - sum(reserve of the later stages) - finish_s``: a stage that ends
early hands its slack to the next ones; ``finish_s`` is kept for the summary and copying results out. A job
starts only if its estimate (:meth:`Clock.estimate_s`: 1.5 x the step-time model's compute + the median
overhead of the jobs finished so far) ends before its stage's deadline; every job is also killed at the hard
end, so no job can push the command past its budget.
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

#: Factor on the step-time model's prediction (uncalibrated on a new GPU) when deciding to start a job.
COMPUTE_SAFETY = 1.5


class Clock:
    """Deadlines of the stages (in order) and the running overhead estimate."""

    def __init__(self, budget_s: float, reserves_s: dict[str, float], finish_s: float, started_at: float,
                 overhead_guess_s: float) -> None:  # fmt: skip
        self.budget_s, self.reserves_s, self.finish_s = budget_s, dict(reserves_s), finish_s
        self.started_at = started_at
        self.overhead_guess_s = overhead_guess_s
        self.overheads_s: list[float] = []

    def elapsed_s(self) -> float:
        return time.time() - self.started_at

    def hard_end_s(self) -> float:
        """Elapsed seconds at which every job must be over."""
        return self.budget_s - self.finish_s

    def deadline_s(self, stage: str, order: Sequence[str]) -> float:
        """Elapsed seconds by which ``stage``'s last job must end: the hard end minus the later stages' reserves."""
        later = order[list(order).index(stage) + 1:]
        return self.hard_end_s() - sum(self.reserves_s.get(s, 0.0) for s in later)

    def estimate_s(self, compute_s: float) -> float:
        """Expected wall time of a job whose predicted compute is ``compute_s``."""
        overhead = statistics.median(self.overheads_s) if self.overheads_s else self.overhead_guess_s
        return COMPUTE_SAFETY * compute_s + overhead

    def observe(self, wall_s: float, compute_s: float) -> None:
        """Learn the per-job overhead from a finished job (its wall time minus its predicted compute)."""
        self.overheads_s.append(max(wall_s - compute_s, 0.0))

    def may_start(self, estimate_s: float, deadline_s: float) -> bool:
        return self.elapsed_s() + estimate_s <= deadline_s

    def job_timeout_s(self, configured_s: float) -> float:
        """The configured job limit, cut to the time left before the hard end (at least 1 s)."""
        return max(1.0, min(configured_s, self.hard_end_s() - self.elapsed_s()))
