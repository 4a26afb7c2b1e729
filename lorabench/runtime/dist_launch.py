"""Launch a multi-device job with torch's own launcher and merge its ranks into one outcome (torch-free).

    python -m torch.distributed.run --nnodes 1 --nproc-per-node N --rdzv-backend c10d
        --rdzv-endpoint localhost:0 --rdzv-conf join_timeout=T --max-restarts 0
        -m lorabench.runtime.distributed --config-json PAYLOAD --out-dir DIR

torchrun (``torch.distributed.run``) starts N ranks, watches them and, when one dies, stops the others
and exits non-zero. The tree runs in its own process group, killed on the job timeout; torchrun gets
SIGKILL when the sweep process dies (``PR_SET_PDEATHSIG``) and each rank exits when torchrun is gone
(:func:`lorabench.runtime.process.watch_parent`), so nothing is left running. Each rank writes ``rank<r>.json``; the record's ``measured`` block is rank 0's plus
``per_rank_peak_bytes`` (the tracker's peak on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU) and
``per_rank`` (each rank's tracker categories, peak and phase, and its first step's peak). A rank without a result makes the job
``failed`` with that rank's last log line. The rendezvous ``join_timeout`` (``dist_timeout_s``) bounds how
long a world that cannot assemble waits before torchrun gives up with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lorabench.runtime.process import die_with_parent
from lorabench.runtime.launch import JobOutcome, child_env, kill_group, last_line

#: Status precedence when ranks disagree (the first present wins).
STATUS_ORDER: tuple[str, ...] = ("oom", "failed", "timeout", "nan", "ok")


def torchrun_command(nproc_per_node: int, payload_path: Path, out_dir: Path, log_dir: Path, *,
                     join_timeout_s: float, nnodes: int = 1, endpoint: str = "localhost:0") -> list[str]:
    """The argv that starts this job's ranks: ``nproc_per_node`` ranks on each of ``nnodes`` nodes, which
    meet at the c10d rendezvous ``endpoint`` (``localhost:0``: a free port on this machine) within
    ``join_timeout_s`` seconds; no restarts (a failed rank fails the job)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--nproc-per-node", str(nproc_per_node), "--max-restarts", "0",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-conf", f"join_timeout={join_timeout_s:g}",
            "--log-dir", str(log_dir), "--redirects", "3",
            "-m", "lorabench.runtime.distributed", "--config-json", str(payload_path), "--out-dir", str(out_dir)]


def slurm_nodes(env: dict[str, str] | None = None) -> int:
    """Nodes of the SLURM allocation this runs in (1 outside SLURM)."""
    env = dict(os.environ if env is None else env)
    return int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))


def visible_devices(device: str) -> int:
    """Ranks this machine can host: CUDA devices NVML sees (honouring ``CUDA_VISIBLE_DEVICES``) on
    ``cuda``, usable CPU cores on ``cpu`` (one single-threaded rank per core)."""
    if device != "cuda":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def check_world(num_gpus: int, sharding: str, device: str) -> str | None:
    """Why a job's world cannot run here (one line naming the problem and a fix), None when it can."""
    if sharding != "none" and num_gpus < 2:
        return (f"sharding={sharding} needs train.num_gpus > 1 (got {num_gpus}); "
                "pass train.num_gpus=2 or more, or train.sharding=none")
    if num_gpus > 1 and slurm_nodes() > 1:
        return ("multi-node jobs are not supported: each node would record the job; "
                "request nodes=1 with gpus_per_node=train.num_gpus (hydra/launcher=slurm_multigpu)")
    if num_gpus > 1:
        have = visible_devices(device)
        unit = "CUDA devices" if device == "cuda" else "CPU cores"
        if num_gpus > have:
            return (f"train.num_gpus={num_gpus} exceeds the {have} {unit} visible here; "
                    f"pass train.num_gpus={max(have, 1)} or less, or run on a larger machine")
    return None


def _rank_logs(log_dir: Path) -> dict[int, Path]:
    """Rank -> its combined log: torchrun writes ``<log_dir>/<run>/attempt_0/<rank>/{stdout,stderr}.log``."""
    logs: dict[int, Path] = {}
    for path in sorted(log_dir.glob("**/attempt_*/*/stderr.log")):
        if path.parent.name.isdigit():
            logs[int(path.parent.name)] = path
    return logs


def merge_ranks(results: dict[int, dict[str, Any]], world_size: int, logs: dict[int, Path],
                launcher_log: Path, returncode: int, wall_s: float) -> JobOutcome:
    """One outcome from the ranks' results: the worst status, rank 0's measurement + per-rank peaks."""
    missing = [r for r in range(world_size) if r not in results]
    statuses = [res.get("status", "failed") for res in results.values()] + ["failed"] * len(missing)
    status = next(s for s in STATUS_ORDER if s in statuses)
    errors = [f"rank {r}: {res['error']}" for r, res in sorted(results.items()) if res.get("error")]
    if not results and not logs:  # torchrun gave up before starting any rank (rendezvous, bad arguments)
        missing = []
        errors.append(f"no rank started: {last_line(launcher_log) or f'torchrun exit status {returncode}'}")
    for rank in missing:
        line = last_line(logs[rank]) if rank in logs else ""
        errors.append(f"rank {rank} died: {line or last_line(launcher_log) or f'exit status {returncode}'}")
    measured = None
    if 0 in results and results[0].get("measured"):
        measured = dict(results[0]["measured"])
        per_rank = [(results.get(r) or {}).get("measured") or {} for r in range(world_size)]
        measured["per_rank_peak_bytes"] = [_rank_peak(m) for m in per_rank]
        measured["per_rank"] = [dict(m.get("tracker") or {}, first_step_peak_bytes=m.get("first_step_peak_bytes"))
                                for m in per_rank]
        measured["world_size"] = world_size
    env = dict((results.get(0) or next(iter(results.values()), {})).get("env") or {})
    return JobOutcome(status=status, measured=measured, error="; ".join(errors)[:600] or None, env=env,
                      wall_s=wall_s, returncode=returncode)


def _rank_peak(measured: dict[str, Any]) -> int | None:
    if measured.get("torch_max_allocated_bytes") is not None:
        return int(measured["torch_max_allocated_bytes"])
    tracker = measured.get("tracker") or {}
    return tracker.get("peak_bytes")


def run_distributed_subprocess(payload: dict[str, Any], nproc_per_node: int, timeout_s: float,
                               join_timeout_s: float, log_dir: Path | None = None,
                               nnodes: int = 1) -> JobOutcome:
    """Run the job's ranks under torchrun; wait at most ``timeout_s`` (then kill the group: ``timeout``).

    Returns one :class:`JobOutcome` (never raises for misbehaving ranks; KeyboardInterrupt kills them).
    ``nnodes`` > 1 makes the rendezvous wait for that many nodes (multi-node runs are refused before this
    by :func:`check_world`; a world that never assembles fails after ``join_timeout_s``).
    """
    work = Path(tempfile.mkdtemp(prefix="lorabench-dist-"))
    out_dir, rank_logs = work / "ranks", work / "logs"
    out_dir.mkdir()
    launcher_log = (Path(log_dir) if log_dir is not None else work) / "job.log"
    launcher_log.parent.mkdir(parents=True, exist_ok=True)
    payload_path = work / "payload.json"
    payload_path.write_text(json.dumps(payload))
    cmd = torchrun_command(nproc_per_node, payload_path, out_dir, rank_logs, join_timeout_s=join_timeout_s,
                           nnodes=nnodes)
    env = child_env()
    env["LORABENCH_DIST_TIMEOUT_S"] = f"{join_timeout_s:g}"
    env.setdefault("OMP_NUM_THREADS", str(payload.get("num_threads") or 1))
    t0 = time.perf_counter()
    try:
        with launcher_log.open("ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True, preexec_fn=die_with_parent)
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                return JobOutcome(status="timeout", error=f"killed after job_timeout_s={timeout_s:g} s",
                                  wall_s=time.perf_counter() - t0, returncode=proc.returncode)
            except BaseException:
                kill_group(proc)
                raise
        _reap_group(proc.pid)
        results = {int(p.stem[4:]): json.loads(p.read_text()) for p in out_dir.glob("rank*.json")}
        logs = _rank_logs(rank_logs)
        if log_dir is not None:
            for rank, path in logs.items():
                shutil.copy(path, Path(log_dir) / f"rank{rank}.log")
        world = nproc_per_node * nnodes
        return merge_ranks(results, world, logs, launcher_log, returncode, time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _reap_group(pgid: int) -> None:
    """Kill whatever of the job's process group outlived torchrun (nothing is left running)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
