"""Progress bars for long commands (tqdm, on stderr): ``advise``/``trace`` searches and the sweep.

A bar appears only once its work has taken ``delay_s`` (1.5 s by default), so fast commands print nothing
extra. :class:`SweepProgress` shows done/total, ok/oom/failed counts and an ETA from the step-time model:
each remaining job is predicted to take ``overhead + steps * predicted_step_s``, where the per-job overhead
(process start, imports, model build) is learned from the jobs already finished.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator


class _Bar:
    """A thin handle over tqdm (or nothing when disabled)."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def update_to(self, done: int, total: int) -> None:
        if self._bar is None:
            return
        if self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def postfix(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)


@contextlib.contextmanager
def progress_bar(desc: str, unit: str = "it", total: int | None = None, enabled: bool = True,
                 delay_s: float = 1.5) -> Iterator[_Bar]:
    """A tqdm bar on stderr that shows up after ``delay_s`` seconds (never when ``enabled`` is False)."""
    if not enabled:
        yield _Bar(None)
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, delay=delay_s, file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        yield _Bar(bar)
    finally:
        bar.close()


@dataclass
class SweepProgress:
    """done/total, status counts and an ETA for a sweep of ``total`` jobs.

    Args:
        predicted_job_s: the step-time model's steps x predicted step seconds of each job, in launch order.
    """

    predicted_job_s: list[float]
    counts: dict[str, int] = field(default_factory=dict)
    overheads_s: list[float] = field(default_factory=list)
    done: int = 0

    @property
    def total(self) -> int:
        return len(self.predicted_job_s)

    def finished(self, status: str, wall_s: float) -> None:
        """Record a finished job (its status and wall time)."""
        self.counts[status] = self.counts.get(status, 0) + 1
        if self.done < self.total:
            self.overheads_s.append(max(0.0, wall_s - self.predicted_job_s[self.done]))
        self.done += 1

    def skipped(self) -> None:
        """A job resumed from an earlier record (counted as done, no time)."""
        self.counts["skipped"] = self.counts.get("skipped", 0) + 1
        self.done += 1

    def eta_s(self) -> float | None:
        """Seconds left: the remaining jobs' predicted compute plus the median per-job overhead so far."""
        if not self.overheads_s:
            return None
        overhead = statistics.median(self.overheads_s)
        return sum(self.predicted_job_s[self.done:]) + overhead * (self.total - self.done)

    def line(self) -> str:
        """``7/24 | ok 5 oom 1 failed 1 | ETA 3.2 min``"""
        from lorabench.units import seconds

        shown = " ".join(f"{k} {self.counts.get(k, 0)}" for k in ("ok", "oom", "failed"))
        extra = " ".join(f"{k} {v}" for k, v in self.counts.items() if k not in ("ok", "oom", "failed"))
        eta = self.eta_s()
        left = "done" if self.done >= self.total else f"ETA {seconds(eta) if eta is not None else '?'}"
        return f"{self.done}/{self.total} | {shown}{' ' + extra if extra else ''} | {left}"


@contextlib.contextmanager
def elapsed(desc: str, enabled: bool = True, delay_s: float = 1.5) -> Iterator[None]:
    """``desc ... 12s`` on stderr while a single long call runs (a thread refreshes it twice a second);
    nothing when the call returns within ``delay_s``."""
    if not enabled:
        yield
        return
    import threading

    from tqdm import tqdm

    bar = tqdm(total=None, desc=desc, bar_format="{desc} {elapsed}", delay=delay_s, file=sys.stderr, leave=False)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            bar.update(0)
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
