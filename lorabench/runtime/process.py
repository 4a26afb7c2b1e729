"""Process-level helpers of a job (stdlib only): dying with the parent sweep, resident-set sizes."""

from __future__ import annotations

import os
import resource
import signal
import threading
import time

#: Seconds between checks that the parent sweep process is still alive.
PARENT_POLL_S = 0.5


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    Immediate, unlike a polling thread, which a loaded machine can starve for seconds. Called in a child
    (after fork, or before exec); a no-op where prctl is absent (not Linux).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def watch_parent(poll_s: float = PARENT_POLL_S) -> None:
    """Exit at once when the parent dies, so a killed sweep leaves no orphan job behind.

    The job runs in its own process group (the parent kills that group on timeout), so a signal to the
    sweep's group does not reach it: the kernel's parent-death signal (:func:`die_with_parent`) ends it,
    and a watchdog thread that notices the re-parenting (exit status 3) covers systems without prctl and
    a parent that died before the signal was armed.
    """
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:
        os._exit(3)

    def run() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=run, name="parent-watchdog", daemon=True).start()


def _maxrss_bytes() -> int:
    """``ru_maxrss`` of this process (Linux reports it in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    """Resident set size of this process now: ``/proc/self/statm`` field 2 (pages) x the page size.

    Falls back to ``ru_maxrss`` where /proc is absent (not Linux). That is a process-wide maximum, so it
    cannot say what a job added in a process that ran something larger before (a test session, say).
    """
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return _maxrss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size so far: max(``ru_maxrss``, the RSS now).

    Linux updates the high-water mark behind ``ru_maxrss`` lazily (on unmap and exit, not on every page
    fault), so mid-process it can read below the current RSS; the max of the two is a true lower bound.
    """
    return max(_maxrss_bytes(), current_rss_bytes())
