"""Run one measurement in a fresh subprocess with a hard time limit (torch-free; used by the sweep parent).

The child (``python -m lorabench.runtime.job --config-json PAYLOAD --out RESULT``) starts in its own process
group, so a timeout kills it and anything it spawned (``SIGKILL`` to the group). It writes its result JSON
atomically (temp file + rename) and the parent turns it into a record; a child that dies without a result is
recorded ``failed`` with the last line of its log. The child also exits by itself when its parent dies
(see :func:`lorabench.runtime.process.watch_parent`), so killing a sweep leaves no orphan measuring on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

#: Statuses a job can end with (the record format's ``status``).
STATUSES: tuple[str, ...] = ("ok", "oom", "failed", "timeout", "nan")
#: Repository root (the folder holding the ``lorabench`` package), put on the child's PYTHONPATH.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


@dataclass
class JobOutcome:
    """What one job subprocess produced.

    Attributes:
        status: one of :data:`STATUSES`.
        measured: the record's ``measured`` block (None when the job died before measuring).
        traced: the record's ``traced`` block (None unless ``trace=true`` and it succeeded).
        error: one line, or None.
        env: device-specific environment fields the child knows (device_name, driver, cuda).
        wall_s: seconds from spawn to exit.
        returncode: the child's exit status (negative: killed by that signal).
    """

    status: str
    measured: dict[str, Any] | None = None
    traced: dict[str, Any] | None = None
    error: str | None = None
    env: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    returncode: int | None = None


def last_line(path: Path, limit: int = 300) -> str:
    """The last non-empty line of a log (where a traceback names its exception)."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:limit] if lines else ""


def _read_env(path: Path) -> dict[str, Any]:
    """The environment the child wrote before measuring ({} when it died before that)."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group, then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def child_env() -> dict[str, str]:
    """The environment of a job's child process: this one's, with lorabench's package importable
    (``PYTHONPATH``) and tokenizers' fork warning off."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def outcome_from_result(result: dict[str, Any], returncode: int, wall_s: float) -> JobOutcome:
    """Build a :class:`JobOutcome` from the child's result JSON."""
    status = str(result.get("status", "failed"))
    if status not in STATUSES:
        status, result = "failed", {**result, "error": f"job reported unknown status {status!r}"}
    return JobOutcome(status=status, measured=result.get("measured"), traced=result.get("traced"),
                      error=result.get("error"), env=dict(result.get("env") or {}), wall_s=wall_s,
                      returncode=returncode)


def run_job_subprocess(payload: dict[str, Any], timeout_s: float, log_dir: Path | None = None) -> JobOutcome:
    """Run ``python -m lorabench.runtime.job`` on ``payload`` and wait at most ``timeout_s`` seconds.

    Args:
        payload: the job description (``config`` block plus runner settings; see :mod:`lorabench.runtime.job`).
        timeout_s: wall-clock limit; past it the process group is killed and the status is ``timeout``.
        log_dir: where the child's stdout+stderr go (``job.log``); a temp dir when None.

    Returns:
        The outcome; never raises for a misbehaving child (KeyboardInterrupt kills it and propagates).
    """
    with job_workdir(log_dir) as (work, log_path):
        return _spawn_and_wait(payload, timeout_s, work, log_path)


@contextlib.contextmanager
def job_workdir(log_dir: Path | None) -> Iterator[tuple[Path, Path]]:
    """(work dir, log path) of one job: a fresh temp dir for the payload and result files, removed after;
    the log goes to ``log_dir/job.log`` (kept), or into the temp dir when ``log_dir`` is None."""
    work = Path(tempfile.mkdtemp(prefix="lorabench-job-"))
    log_path = (Path(log_dir) if log_dir is not None else work) / "job.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield work, log_path
    finally:
        for name in ("payload.json", "result.json", "result.json.env"):
            (work / name).unlink(missing_ok=True)
        if log_dir is not None:
            shutil.rmtree(work, ignore_errors=True)


def _spawn_and_wait(payload: dict[str, Any], timeout_s: float, work: Path, log_path: Path) -> JobOutcome:
    payload_path, result_path = work / "payload.json", work / "result.json"
    payload_path.write_text(json.dumps(payload))
    cmd = [sys.executable, "-m", "lorabench.runtime.job", "--config-json", str(payload_path),
           "--out", str(result_path)]
    t0 = time.perf_counter()
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env(), start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return timeout_outcome(timeout_s, work, time.perf_counter() - t0, proc.returncode)
        except BaseException:
            kill_group(proc)
            raise
    return outcome_from_files(work, log_path, returncode, time.perf_counter() - t0)


def outcome_from_files(work: Path, log_path: Path, returncode: int, wall_s: float) -> JobOutcome:
    """The outcome of a finished job from what it left in ``work`` (``result.json``, ``result.json.env``)."""
    result_path, env_path = work / "result.json", work / "result.json.env"
    if result_path.is_file():
        return outcome_from_result(json.loads(result_path.read_text()), returncode, wall_s)
    if returncode < 0:
        error = f"job killed by signal {signal.Signals(-returncode).name}"
    else:
        error = f"job exited with status {returncode}: {last_line(log_path) or 'no output'}"
    return JobOutcome(status="failed", error=error, env=_read_env(env_path), wall_s=wall_s, returncode=returncode)


def timeout_outcome(timeout_s: float, work: Path, wall_s: float, returncode: int | None) -> JobOutcome:
    """A job killed at its time limit (its environment kept when it had written it)."""
    return JobOutcome(status="timeout", error=f"killed after job_timeout_s={timeout_s:g} s",
                      env=_read_env(work / "result.json.env"), wall_s=wall_s, returncode=returncode)
