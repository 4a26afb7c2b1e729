"""Fork-per-job server: import torch, transformers and the runtime once, then fork one child per job.

A fresh ``python -m lorabench.runtime.job`` pays ~5 s of imports per job on the CPU here
(:mod:`lorabench.runtime.launch`). The server pays them once: :meth:`JobServer.start` imports the runtime
and builds every model of the sweep once on ``meta`` (no storage, no CUDA), which imports the lazily
loaded transformers/PEFT/method modules too. :meth:`JobServer.run` then forks a child per job, which runs
exactly the subprocess job's code (:func:`lorabench.runtime.job.run_payload`) and exits.

Isolation stays one job = one process:

- the parent never initialises CUDA (checked before every fork: ``torch.cuda.is_initialized()`` is False and
  the CUDA driver library is not mapped into the process), so each child creates its own CUDA context,
  and an OOM or a crash dies with the child;
- each child starts its own NVML sampler, so each job has its own NVML baseline (taken before its context);
- each child runs in its own session (process group): a timeout kills the child and anything it spawned;
- the child exits with ``os._exit`` (no atexit handlers, no Hydra teardown of the parent's state).

``PYTORCH_NVML_BASED_CUDA_CHECK=1`` is set in the parent, so an incidental ``torch.cuda.is_available()``
(a library asking at import) asks NVML and does not initialise CUDA in the parent (PyTorch's documented
fork-safe check, docs/SOURCES.md#fork-cuda). bitsandbytes is never imported in the parent: it queries CUDA
at import.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterable

from lorabench.runtime.launch import JobOutcome, job_workdir, outcome_from_files, timeout_outcome

#: Modules the parent imports before the first fork (the children inherit them).
PRELOAD_MODULES: tuple[str, ...] = (
    "torch", "transformers", "lorabench.runtime.job", "lorabench.runtime.build", "lorabench.runtime.step",
    "lorabench.runtime.tracker", "lorabench.runtime.probe", "lorabench.memory.planner",
)
#: Seconds between checks of a child when the platform has no pidfd.
POLL_S = 0.005


class CudaInParent(RuntimeError):
    """The job server's parent initialised CUDA: a forked child could not use the GPU safely."""


def cuda_driver_loaded() -> bool:
    """Whether the CUDA driver library (``libcuda.so``) is mapped into this process (Linux; False elsewhere).

    The CUDA runtime loads the driver on its first call (``cuInit``); torch links the runtime but not the
    driver, so an import of torch alone does not map it.
    """
    try:
        return "libcuda.so" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def assert_no_cuda() -> None:
    """Raise :class:`CudaInParent` when this process has initialised CUDA (torch's lazy init or the driver)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise CudaInParent("the job server's parent initialised torch.cuda; jobs must create their own context")
    if cuda_driver_loaded():
        raise CudaInParent("the job server's parent loaded the CUDA driver (libcuda.so); fork would be unsafe")


def warm_model(spec: Any, method: Any, train: Any) -> None:
    """Build ``spec`` + ``method`` once on meta: imports every module the real build imports, allocates nothing."""
    from lorabench.runtime.build import prepare_model

    prepare_model(spec, method, train, device="meta")


class JobServer:
    """Imports once, forks per job. Use one per process (:func:`shared`)."""

    def __init__(self, preload: Iterable[str] = PRELOAD_MODULES) -> None:
        self.preload = tuple(preload)
        self.start_s: float | None = None
        self._warmed: set[str] = set()

    def start(self) -> float:
        """Import :data:`PRELOAD_MODULES` (idempotent); returns the seconds it took (0 when already started)."""
        if self.start_s is not None:
            return 0.0
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        t0 = time.perf_counter()
        import importlib

        for name in self.preload:
            importlib.import_module(name)
        assert_no_cuda()
        self.start_s = time.perf_counter() - t0
        return self.start_s

    def warm(self, key: str, spec: Any, method: Any, train: Any) -> None:
        """:func:`warm_model` once per ``key`` (e.g. model + method name); errors are left to the job."""
        if key in self._warmed:
            return
        self._warmed.add(key)
        try:
            warm_model(spec, method, train)
        except Exception:  # the job itself reports the problem, in its own record
            pass
        assert_no_cuda()

    def run(self, payload: dict[str, Any], timeout_s: float, log_dir: Path | None = None) -> JobOutcome:
        """Run one job in a forked child and wait at most ``timeout_s`` seconds (same contract as
        :func:`lorabench.runtime.launch.run_job_subprocess`)."""
        self.start()
        assert_no_cuda()
        with job_workdir(log_dir) as (work, log_path):
            sys.stdout.flush()
            sys.stderr.flush()
            t0 = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                _child(payload, work, log_path)  # never returns
            try:
                returncode = wait_child(pid, timeout_s)
            except BaseException:
                kill_child(pid)
                raise
            wall_s = time.perf_counter() - t0
            if returncode is None:
                return timeout_outcome(timeout_s, work, wall_s, kill_child(pid))
            return outcome_from_files(work, log_path, returncode, wall_s)


def _child(payload: dict[str, Any], work: Path, log_path: Path) -> None:
    """The forked child: own session, output to the job log, run the job, write the result, ``os._exit``."""
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        from lorabench.runtime import job

        job.watch_parent()
        result = job.run_payload(payload, env_path=work / "result.json.env")
        job.write_json(work / "result.json", result)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait_child(pid: int, timeout_s: float) -> int | None:
    """Wait for child ``pid``; its exit status (negative: killed by that signal), or None past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    pidfd = _pidfd(pid)
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(POLL_S, left))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)  # type: ignore[attr-defined]  # Linux >= 5.3, Python >= 3.9
    except (AttributeError, OSError):
        return None


def kill_child(pid: int) -> int | None:
    """SIGKILL the child's process group (it leads its own session), then reap it; its exit status."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except ChildProcessError:
        return None


_SHARED: JobServer | None = None


def shared() -> JobServer:
    """This process's job server (created on first use)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = JobServer()
    return _SHARED
