"""Fork-per-job server: import torch, transformers and the runtime once, then fork one child per job.

A fresh ``python -m lorabench.runtime.job`` pays ~4-5 s of imports per job on the CPU here
(:mod:`lorabench.runtime.launch`). The server pays them once: it starts a clean helper process (Python's
``forkserver``: a fresh interpreter that imports :data:`PRELOAD_MODULES`, plus the modeling modules of the
models about to run, and then only ever forks), and :meth:`JobServer.run` has it fork one child per job, which
runs exactly the subprocess job's code (:func:`lorabench.runtime.job.run_payload`) and exits. The helper never
runs a torch op, so no OpenMP pool or CUDA state exists to be inherited (a fork of a process that has run CPU
kernels can hang in the child's first parallel region), whatever the calling process did before.

Isolation stays one job = one process:

- the process the children are forked from never initialises CUDA: each child checks at its start that torch's
  CUDA is not initialised and torch's bad-fork flag is not set (:func:`assert_no_cuda`), then creates its own
  CUDA context; an OOM or a crash dies with the child;
- each child starts its own NVML sampler, so each job has its own NVML baseline (taken before its context);
- each child runs in its own session (process group): a timeout kills the child and anything it spawned;
- the child exits with ``os._exit`` (no atexit handlers).

``PYTORCH_NVML_BASED_CUDA_CHECK=1`` is set, so an incidental ``torch.cuda.is_available()`` (a library asking
at import) asks NVML and does not initialise CUDA (PyTorch's documented fork-safe check,
docs/SOURCES.md#fork-cuda). bitsandbytes is never preloaded: it queries CUDA at import.
"""

from __future__ import annotations

import os
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


class CudaInParent(RuntimeError):
    """The job server's parent initialised CUDA: a forked child could not use the GPU safely."""


def cuda_driver_loaded() -> bool:
    """Whether the CUDA driver library (``libcuda.so``) is mapped into this process (Linux; False elsewhere).

    Informational (the tests check it on CPU machines): mapping the driver is not initialising it, and whether a
    CUDA build of torch maps it at import is not checked on a GPU yet, so :func:`assert_no_cuda` does not use it.
    """
    try:
        return "libcuda.so" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def assert_no_cuda() -> None:
    """Raise :class:`CudaInParent` when this process initialised CUDA through torch, or (in a forked child)
    its parent did: ``torch.cuda.is_initialized()``, or torch's bad-fork flag (set in a child forked after
    the parent's CUDA init)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    if torch.cuda.is_initialized():
        raise CudaInParent("the job server's parent initialised torch.cuda; jobs must create their own context")
    in_bad_fork = getattr(torch._C, "_cuda_isInBadFork", None)
    if in_bad_fork is not None and in_bad_fork():
        raise CudaInParent("this job was forked from a process that initialised CUDA; jobs need their own context")


def preload_for(spec: Any, method: Any) -> tuple[str, ...]:
    """The modules a job of ``spec`` + ``method`` imports lazily: its transformers modeling module, PEFT and
    the method's runtime (imported in the helper once instead of in every child; missing ones are skipped)."""
    return (f"transformers.models.{spec.model_type}.modeling_{spec.model_type}", "peft",
            f"lorabench.methods.{method.name}.layer")


class JobServer:
    """Forks one child per job from a clean helper process that imported the runtime once."""

    def __init__(self, preload: Iterable[str] = PRELOAD_MODULES) -> None:
        self.preload = list(preload)
        self.start_s: float | None = None
        self._ctx: Any = None

    def start(self, extra_preload: Iterable[str] = ()) -> float:
        """Start the helper (idempotent): it imports :data:`PRELOAD_MODULES` and ``extra_preload``. Returns the
        seconds it took (0 when already started)."""
        if self.start_s is not None:
            return 0.0
        import importlib.util
        import multiprocessing

        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        mods = [m for m in [*self.preload, *extra_preload] if _importable(m, importlib.util)]
        t0 = time.perf_counter()
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(dict.fromkeys(mods)))
        probe = self._ctx.Process(target=_noop)  # the helper imports everything before forking this one
        probe.start()
        probe.join()
        self.start_s = time.perf_counter() - t0
        return self.start_s

    def warm(self, key: str, spec: Any, method: Any, train: Any) -> None:
        """Before the first job: preload the modeling and method modules of this job too (later keys: no-op,
        their children import them themselves)."""
        if self.start_s is None:
            try:
                self.start(preload_for(spec, method))
            except Exception:  # an unknown model type: the plain preload, the child imports the rest
                self.start()

    def run(self, payload: dict[str, Any], timeout_s: float, log_dir: Path | None = None,
            runner: Any = None) -> JobOutcome:  # fmt: skip
        """Run one job in a forked child and wait at most ``timeout_s`` seconds (same contract as
        :func:`lorabench.runtime.launch.run_job_subprocess`). ``runner(payload, env_path)`` replaces
        :func:`lorabench.runtime.job.run_payload` (a module-level function: tests)."""
        self.start()
        with job_workdir(log_dir) as (work, log_path):
            t0 = time.perf_counter()
            proc = self._ctx.Process(target=_child, args=(payload, str(work), str(log_path), runner), daemon=False)
            proc.start()
            try:
                returncode = wait_child(proc, timeout_s)
            except BaseException:
                kill_child(proc)
                raise
            wall_s = time.perf_counter() - t0
            if returncode is None:
                return timeout_outcome(timeout_s, work, wall_s, kill_child(proc))
            return outcome_from_files(work, log_path, returncode, wall_s)


def _importable(name: str, util: Any) -> bool:
    try:
        return util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _noop() -> None:
    """The helper's first child: proves the preload worked (the helper imports before it forks)."""


def _child(payload: dict[str, Any], work: str, log_path: str, runner: Any) -> None:
    """The forked child: own session, output to the job log, run the job, write the result, ``os._exit``."""
    code = 1
    try:
        os.setsid()
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        assert_no_cuda()  # the process this child was forked from must never have touched CUDA
        from lorabench.runtime import job

        job.watch_parent()
        run = runner or job.run_payload
        result = run(payload, env_path=Path(work) / "result.json.env")
        job.write_json(Path(work) / "result.json", result)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait_child(proc: Any, timeout_s: float) -> int | None:
    """Wait for the child; its exit status (negative: killed by that signal), or None past ``timeout_s``."""
    proc.join(timeout_s)
    return proc.exitcode


def kill_child(proc: Any) -> int | None:
    """SIGKILL the child's process group (it leads its own session), then reap it; its exit status."""
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            kill()
            break
        except (ProcessLookupError, PermissionError):
            continue
    proc.join()
    return proc.exitcode


_SHARED: JobServer | None = None


def shared() -> JobServer:
    """This process's job server (created on first use)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = JobServer()
    return _SHARED
