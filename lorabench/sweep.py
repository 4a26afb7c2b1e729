"""The sweep runner: a Hydra app whose every job is one real training run, measured and recorded.

    python -m lorabench.sweep model=tiny-llama method=lora device=cpu          # one run
    python -m lorabench.sweep -m method=lora,qlora train.seq_len=128,256       # a grid (Hydra multirun)
    python -m lorabench.sweep -m sweep=cpu-smoke                               # a preset (conf/sweep/)

Per job, this (parent) process:

1. composes the specs from the Hydra config and computes the record's ``config`` block and its ``run_id``;
2. skips the job when ``results/<sweep_name>/records.jsonl`` already holds that run_id as completed (resume);
3. predicts memory with the torch-free planner (so even a crash or a timeout has its prediction beside it);
4. runs the measurement in its own process, killed after ``job_timeout_s``: by default a child forked from
   this process's job server (:mod:`lorabench.runtime.jobserver`: torch and transformers imported once, CUDA
   never initialised here), with ``job_launcher=subprocess`` a fresh ``python -m lorabench.runtime.job``
   (:mod:`lorabench.runtime.launch`) for launchers that need one, torchrun for ``num_gpus`` > 1;
5. appends exactly one record (only this process writes records, so a SIGKILL never leaves half a record)
   and prints one progress line.

A job never raises into Hydra: every failure becomes a record, so the sweep goes on.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lorabench import records
from lorabench.errors import UserError
from lorabench.jobs import (RUNNER_TRAIN_KEYS, JobSpecs, PreparedJob, build_specs, job_payload,  # noqa: F401
                            predicted_block, prepare_job, raw_config, record_config, runnable)
from lorabench.runtime.launch import JobOutcome, run_job_subprocess
from lorabench.runtime.probe import resolve_device

SCHEMA = 1
# ---------------------------------------------------------------------------------------------- sweep helpers
def _node_value(cfg: DictConfig, key: str) -> Any:
    """Value of a dotted key; the config groups model/method/optimizer/gpu compare by their ``name``."""
    value = OmegaConf.select(cfg, key)
    if isinstance(value, DictConfig) and "name" in value:
        return value.name
    return value


def is_excluded(cfg: DictConfig) -> bool:
    """True when the job matches every key of one ``sweep_exclude`` rule (value or list of values)."""
    for rule in cfg.get("sweep_exclude") or []:
        if all(_node_value(cfg, key) in (list(want) if OmegaConf.is_list(want) else [want])
               for key, want in rule.items()):
            return True
    return False


def job_position() -> tuple[int, int | None]:
    """(k, N): this job's 1-based index in the sweep and the sweep's job count (None when unknown).

    N is recomputed the way Hydra's BasicSweeper expands the grid: ``hydra.sweeper.params`` plus the
    command-line overrides, as saved in the sweep directory's ``multirun.yaml``.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return 1, 1
    k = int(hc.job.num) + 1
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        saved = OmegaConf.load(Path(hc.sweep.dir) / "multirun.yaml")
        params = [f"{key}={value}" for key, value in (saved.hydra.sweeper.params or {}).items()]
        params += list(saved.hydra.overrides.task)
        sizes: dict[str, int] = {}
        for override in OverridesParser.create().parse_overrides(params):
            sizes[override.get_key_element()] = (len(list(override.sweep_string_iterator()))
                                                 if override.is_sweep_override() else 1)
        return k, math.prod(sizes.values())
    except Exception:  # another sweeper, or an unreadable multirun.yaml
        return k, None


def results_path(cfg: DictConfig) -> Path:
    """``<results_dir>/<sweep_name>/records.jsonl``; a relative results_dir is relative to the launch dir."""
    from hydra.core.hydra_config import HydraConfig

    base = Path(str(cfg.results_dir))
    if not base.is_absolute():
        base = Path(HydraConfig.get().runtime.cwd) / base
    return base / str(cfg.sweep_name) / "records.jsonl"


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:.2f} MiB"


def progress_line(k: int, n: int | None, record: dict[str, Any], wall_s: float) -> str:
    """``[k/N] status model method mbs seq prec ckpt | peak .. pred .. (err) | tok/s | seconds``.

    peak: ``torch.cuda.max_memory_allocated`` on GPU, the tracker's tensor peak on CPU (the largest rank's for
    a multi-rank job); err = (predicted - measured) / measured, the planner's error at the allocated level.
    """
    cfg, measured, predicted = record["config"], record.get("measured") or {}, record.get("predicted") or {}
    train = cfg["train"]
    tracker = measured.get("tracker") or {}
    peak = measured.get("torch_max_allocated_bytes") or tracker.get("peak_bytes")
    ranks = [p for p in measured.get("per_rank_peak_bytes") or [] if p]
    peak = max(ranks) if ranks else peak  # a multi-rank job: its largest rank (the planner predicts per GPU)
    pred = predicted.get("peak_allocated_bytes")
    err = f" (err {100 * (pred - peak) / peak:+.1f}%)" if peak and pred else ""  # planner error vs measured
    tps = measured.get("tokens_per_s")
    parts = [f"[{k}/{n if n else k}] {record['status']:<7}", cfg["model"], cfg["method"]["method"],
             f"mbs={train['micro_batch_size']} seq={train['seq_len']} {train['precision']}"
             f" ckpt={'on' if train['gradient_checkpointing'] else 'off'}"
             + (f" x{train['num_gpus']} {train['sharding']}" if train.get("num_gpus", 1) > 1 else ""),
             f"| peak {_mib(peak)}{' max rank' if ranks else ''} pred {_mib(pred)}{err}",
             f"| {tps:.0f} tok/s" if tps else "| - tok/s", f"| {wall_s:.1f}s"]
    if record.get("error"):
        parts.append(f"| {record['error'][:160]}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------- one job
def fallback_environment(device: str) -> dict[str, Any]:
    """``records.environment(device)`` computed in a short-lived subprocess, for a job that died before
    reporting its own: on a GPU machine it imports torch and queries CUDA, which must never happen in this
    long-lived parent (a CUDA context here would eat memory the jobs are measuring)."""
    code = "import json,sys; from lorabench.records import environment; print(json.dumps(environment(sys.argv[1])))"
    try:
        out = subprocess.run([sys.executable, "-c", code, device], capture_output=True, text=True, timeout=120,
                             cwd=str(Path(__file__).resolve().parents[1]))
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))
    except Exception as err:  # keep the record: env is informative, never worth losing a result for
        return {"device_name": "unknown", "error": f"{type(err).__name__}: {err}"}


def check_job(cfg: DictConfig) -> JobSpecs:
    """The job's specs, or UserError when the config cannot be run as given (the planner's rules,
    :mod:`lorabench.validation`, plus a known device and one unsharded process)."""
    from lorabench.memory.planner import validate
    from lorabench.validation import validate_device

    validate_device(str(cfg.device))
    specs = build_specs(cfg)
    validate(specs.model, specs.method, specs.train)
    from lorabench.methods import get as get_method
    from lorabench.recipes import check_stack

    check_stack(specs.method, specs.train, get_method(specs.method.name).estimator)
    problem = runnable(specs, resolve_device(str(cfg.device)))
    if problem:
        raise UserError(problem)
    return specs


def refuse(err: UserError, where: str = "") -> None:
    """One line on stderr and exit code 2 (nothing has run, nothing is recorded)."""
    sys.stderr.write(f"lorabench run: error: {where}{err}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def job_timing(measured: dict[str, Any] | None, wall_s: float) -> dict[str, float]:
    """The job's wall time (fork/spawn to exit) and its overhead: wall - model build - steps - trace, i.e.
    what launching, imports, the environment and writing results cost on top of the measurement itself."""
    m = measured or {}
    spent_s = sum(float(m.get(key) or 0.0) for key in ("build_s", "steps_s", "trace_s"))
    return {"job_wall_s": wall_s, "job_overhead_s": wall_s - spent_s}


def make_record(cfg: DictConfig, config: dict[str, Any], predicted: dict[str, Any] | None,
                outcome: JobOutcome, errors: list[str]) -> dict[str, Any]:
    """Assemble the shared record (common brief's format) from the parent's and the job's parts."""
    error = "; ".join([e for e in errors + [outcome.error or ""] if e]) or None
    measured = outcome.measured
    if measured is not None:
        measured = {**measured, **job_timing(measured, outcome.wall_s)}
    return {
        "schema": SCHEMA,
        "run_id": records.run_id(config),
        "sweep": str(cfg.sweep_name),
        "status": outcome.status,
        "config": config,
        "predicted": predicted,
        "traced": outcome.traced,
        "measured": measured,
        "error": error,
        "env": outcome.env or fallback_environment(config["device"]),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def launch_job(cfg: DictConfig, job: PreparedJob, log_dir: Path | None) -> JobOutcome:
    """Measure a prepared job in its own process(es): torchrun with ``num_gpus`` ranks for a multi-GPU job,
    else a child forked from this process's job server (``job_launcher=fork``, the default) or a fresh
    interpreter (``job_launcher=subprocess``)."""
    if job.specs is None or job.problem:
        return JobOutcome(status="failed", error=job.problem)
    payload = job_payload(cfg, job.specs, job.config)
    timeout_s = float(cfg.job_timeout_s)
    if job.specs.train.num_gpus > 1:
        from lorabench.runtime.dist_launch import run_distributed_subprocess

        return run_distributed_subprocess(payload, job.specs.train.num_gpus, timeout_s=timeout_s,
                                          join_timeout_s=float(cfg.dist_timeout_s), log_dir=log_dir)
    if str(cfg.get("job_launcher", "fork")) == "subprocess":
        return run_job_subprocess(payload, timeout_s=timeout_s, log_dir=log_dir)
    from lorabench.runtime import jobserver

    server = jobserver.shared()
    server.warm(f"{job.specs.model.name}/{job.specs.method.to_dict()}", job.specs.model, job.specs.method,
                job.specs.train)
    return server.run(payload, timeout_s=timeout_s, log_dir=log_dir)


def finish_job(cfg: DictConfig, job: PreparedJob, outcome: JobOutcome, path: Path) -> dict[str, Any]:
    """Append the job's one record to ``path`` (at once: a killed sweep keeps every finished job)."""
    record = make_record(cfg, job.config, job.predicted, outcome, job.errors)
    records.append_record(path, record)
    return record


def run_one(cfg: DictConfig) -> dict[str, Any] | None:
    """Run (or skip) one Hydra job; return the record appended, None when skipped. Never raises for a job."""
    t0 = time.perf_counter()
    k, n = job_position()
    position = f"[{k}/{n if n else k}]"
    if is_excluded(cfg):
        print(f"{position} skip (excluded by sweep_exclude) {cfg.model.name} {cfg.method.name}", flush=True)
        _progress("job_skipped", cfg)
        return None
    path = results_path(cfg)
    try:  # an invalid config is refused before anything runs (a multirun was checked whole by runconfig)
        specs = check_job(cfg)
        device = resolve_device(str(cfg.device))
    except UserError as err:
        refuse(err)
    job = prepare_job(cfg, specs, device)
    if job.run_id in records.completed_ids(path, statuses=tuple(cfg.get("resume_skip") or ("ok",))):
        print(f"{position} skip (recorded) {job.run_id} {job.config['model']} {job.config['method']['method']}",
              flush=True)
        _progress("job_skipped", cfg)
        return None
    record = finish_job(cfg, job, launch_job(cfg, job, _job_dir()), path)
    print(progress_line(k, n, record, time.perf_counter() - t0), flush=True)
    _progress("job_finished", cfg, record["status"], time.perf_counter() - t0)
    return record


def _progress(hook: str, cfg: DictConfig, *args: Any) -> None:
    """The progress bar with ETA (lorabench.sweep_progress) in multiruns; it never fails a job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            from lorabench import sweep_progress

            getattr(sweep_progress, hook)(cfg, *args, specs_of=build_specs)
    except Exception as err:  # a display problem must not touch the sweep
        print(f"(progress bar off: {type(err).__name__}: {err})", file=sys.stderr, flush=True)


def _job_dir() -> Path:
    """The Hydra job's own output directory (under results/_scratch/hydra/), for the job's log."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


#: The repository's conf/ (absolute, so the app composes the same whether started as ``python -m
#: lorabench.sweep``, where Hydra resolves paths from the file, or from ``lorabench run``, where it would
#: look for a ``conf`` Python package).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra entry point: one call per job (multirun) or one run.

    An exception escaping a job would make Hydra abandon the rest of the sweep; job problems are records
    already, so what reaches here is a bug in the runner itself: report it loudly and go on.
    """
    try:
        run_one(cfg)
    except Exception:
        print(f"runner error (no record written):\n{traceback.format_exc()}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
