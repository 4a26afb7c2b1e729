"""The sweep runner: a Hydra app whose every job is one real training run, measured and recorded.

    python -m lorabench.sweep model=tiny-llama method=lora device=cpu          # one run
    python -m lorabench.sweep -m method=lora,qlora train.seq_len=128,256       # a grid (Hydra multirun)
    python -m lorabench.sweep -m sweep=cpu-smoke                               # a preset (conf/sweep/)

Per job, this (parent) process:

1. composes the specs from the Hydra config and computes the record's ``config`` block and its ``run_id``;
2. skips the job when ``results/<sweep_name>/records.jsonl`` already holds that run_id as completed (resume);
3. predicts memory with the torch-free planner (so even a crash or a timeout has its prediction beside it);
4. runs the measurement in a FRESH subprocess (``python -m lorabench.runtime.job``, see
   :mod:`lorabench.runtime.launch`), killed after ``job_timeout_s``;
5. appends exactly one record (only this process writes records, so a SIGKILL never leaves half a record)
   and prints one progress line.

A job never raises into Hydra: every failure becomes a record, so the sweep goes on.
"""

from __future__ import annotations

import dataclasses
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
from lorabench.runtime.launch import JobOutcome, run_job_subprocess
from lorabench.runtime.probe import detect_gpu, resolve_device

SCHEMA = 1
#: Keys of the ``train`` config node that are runner settings, not TrainSpec fields.
RUNNER_TRAIN_KEYS: tuple[str, ...] = ("warmup_steps", "timed_steps", "lr")


@dataclasses.dataclass(frozen=True)
class JobSpecs:
    """The typed specs of one job, composed from its Hydra config."""

    model: Any  # ModelSpec
    method: Any  # MethodConfig
    train: Any  # TrainSpec
    gpu: Any  # GpuSpec | None
    hf_overrides: dict[str, Any]


# ---------------------------------------------------------------------------------------------- composition
def build_specs(cfg: DictConfig) -> JobSpecs:
    """ModelSpec (honouring ``model.hf_config.*`` overrides), MethodConfig, TrainSpec and GpuSpec of a job.

    Raises:
        UserError: unknown model/GPU/optimizer, a knob the method lacks, an invalid value.
    """
    from lorabench.architectures import spec_from_hf_config
    from lorabench.catalog import load_gpu, load_model
    from lorabench.methods import make_config
    from lorabench.specs import resolve_optimizer
    from lorabench.validation import train_from_fields

    name = str(cfg.model.name)
    catalog_spec = load_model(name)
    hf_config = OmegaConf.to_container(cfg.model.hf_config, resolve=True)
    overrides = {k: v for k, v in hf_config.items() if catalog_spec.hf_config.get(k, object()) != v}
    model = (spec_from_hf_config(hf_config, name=name, display=catalog_spec.display) if overrides else catalog_spec)
    knobs = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k != "name"}
    method = make_config(str(cfg.method.name), knobs)
    train_fields = {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items()
                    if k not in RUNNER_TRAIN_KEYS}
    optimizer, implied = resolve_optimizer(str(cfg.optimizer.name))  # an HF optim alias implies its impl
    if train_fields.get("adamw_impl") is None:
        train_fields["adamw_impl"] = implied or "foreach"
    train = train_from_fields(train_fields, optimizer=optimizer)
    gpu = load_gpu(str(cfg.gpu.name)) if cfg.get("gpu") else None
    return JobSpecs(model=model, method=method, train=train, gpu=gpu, hf_overrides=overrides)


def record_config(cfg: DictConfig, specs: JobSpecs, device: str) -> dict[str, Any]:
    """The record's ``config`` block: everything that defines the run (and hence its run_id).

    ``model_hf_config_overrides`` appears only when ``model.hf_config.*`` was overridden on the command line,
    so that such runs get their own run_id.
    """
    config: dict[str, Any] = {
        "model": specs.model.name,
        "method": specs.method.to_dict(),
        "train": specs.train.to_record(),
        "device": device,
        "gpu": specs.gpu.name if specs.gpu else None,
        "memory_cap_bytes": None if cfg.memory_cap_bytes is None else int(cfg.memory_cap_bytes),
        "warmup_steps": int(cfg.train.warmup_steps),
        "timed_steps": int(cfg.train.timed_steps),
        "seed": int(cfg.seed),
    }
    if specs.hf_overrides:
        config["model_hf_config_overrides"] = specs.hf_overrides
    return config


def raw_config(cfg: DictConfig, device: str) -> dict[str, Any]:
    """A best-effort ``config`` block for a job whose specs could not even be built (recorded as failed)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    method = {k: v for k, v in container["method"].items() if k != "name"}
    train = {k: v for k, v in container["train"].items() if k not in RUNNER_TRAIN_KEYS}
    train["optimizer"] = container["optimizer"]["name"]
    return {"model": container["model"]["name"], "method": {"method": container["method"]["name"], **method},
            "train": train, "device": device, "gpu": (container.get("gpu") or {}).get("name"),
            "memory_cap_bytes": container.get("memory_cap_bytes"),
            "warmup_steps": container["train"]["warmup_steps"], "timed_steps": container["train"]["timed_steps"],
            "seed": container["seed"]}


def predicted_block(specs: JobSpecs, device: str, cap_bytes: int | None) -> dict[str, Any]:
    """``planner.predict`` for exactly this config, plus ``fits``: against the memory cap when one is set
    (CPU: tensor bytes; GPU: reserved bytes, which is what ``set_per_process_memory_fraction`` limits),
    else against the config's GPU, else None."""
    from lorabench.memory import planner

    prediction = planner.predict(specs.model, specs.method, specs.train, specs.gpu)
    block = dict(prediction.to_dict())
    if cap_bytes is not None:
        level = prediction.peak_allocated_bytes if device == "cpu" else prediction.reserved_bytes
        block["fits"] = bool(level <= cap_bytes)
    elif specs.gpu is not None:
        block["fits"] = bool(planner.fits(prediction, specs.gpu).fits)
    else:
        block["fits"] = None
    return block


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

    peak: ``torch.cuda.max_memory_allocated`` on GPU, the tracker's tensor peak on CPU; err = (predicted -
    measured) / measured, the planner's error at the allocated level.
    """
    cfg, measured, predicted = record["config"], record.get("measured") or {}, record.get("predicted") or {}
    train = cfg["train"]
    tracker = measured.get("tracker") or {}
    peak = measured.get("torch_max_allocated_bytes") or tracker.get("peak_bytes")
    pred = predicted.get("peak_allocated_bytes")
    err = f" (err {100 * (pred - peak) / peak:+.1f}%)" if peak and pred else ""  # planner error vs measured
    tps = measured.get("tokens_per_s")
    parts = [f"[{k}/{n if n else k}] {record['status']:<7}", cfg["model"], cfg["method"]["method"],
             f"mbs={train['micro_batch_size']} seq={train['seq_len']} {train['precision']}"
             f" ckpt={'on' if train['gradient_checkpointing'] else 'off'}",
             f"| peak {_mib(peak)} pred {_mib(pred)}{err}",
             f"| {tps:.0f} tok/s" if tps else "| - tok/s", f"| {wall_s:.1f}s"]
    if record.get("error"):
        parts.append(f"| {record['error'][:160]}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------- one job
def job_payload(cfg: DictConfig, specs: JobSpecs, config: dict[str, Any]) -> dict[str, Any]:
    """What the job subprocess needs (:mod:`lorabench.runtime.job`): the config block plus runner settings."""
    return {"config": config, "hf_config": dict(specs.model.hf_config), "lr": float(cfg.train.lr),
            "trace": bool(cfg.trace), "num_threads": cfg.num_threads, "sampler_hz": float(cfg.sampler_hz),
            "gpu": dataclasses.asdict(specs.gpu) if specs.gpu else None}


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


def runnable(specs: JobSpecs, device: str = "cuda") -> str | None:
    """Why this config cannot be measured on ``device`` (None when it can): a world that does not fit
    (``dist_launch.check_world``), or the method's own refusal (``MethodConfig.run_problem``: the
    bitsandbytes CPU rows problem)."""
    from lorabench.runtime.dist_launch import check_world

    return (check_world(specs.train.num_gpus, specs.train.sharding, device)
            or specs.method.run_problem(specs.model, device))


def launch(cfg: DictConfig, specs: JobSpecs, config: dict[str, Any]) -> JobOutcome:
    """One subprocess for a single-device job, torchrun with ``num_gpus`` ranks otherwise."""
    payload = job_payload(cfg, specs, config)
    if specs.train.num_gpus > 1:
        from lorabench.runtime.dist_launch import run_distributed_subprocess

        return run_distributed_subprocess(payload, specs.train.num_gpus, timeout_s=float(cfg.job_timeout_s),
                                          join_timeout_s=float(cfg.dist_timeout_s), log_dir=_job_dir())
    return run_job_subprocess(payload, timeout_s=float(cfg.job_timeout_s), log_dir=_job_dir())


def check_job(cfg: DictConfig) -> JobSpecs:
    """The job's specs, or UserError when the config cannot be run as given (the planner's rules,
    :mod:`lorabench.validation`, plus a known device and one unsharded process)."""
    from lorabench.memory.planner import validate
    from lorabench.validation import validate_device

    validate_device(str(cfg.device))
    specs = build_specs(cfg)
    validate(specs.model, specs.method, specs.train)
    problem = runnable(specs, resolve_device(str(cfg.device)))
    if problem:
        raise UserError(problem)
    return specs


def refuse(err: UserError, where: str = "") -> None:
    """One line on stderr and exit code 2 (nothing has run, nothing is recorded)."""
    sys.stderr.write(f"lorabench run: error: {where}{err}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def make_record(cfg: DictConfig, config: dict[str, Any], predicted: dict[str, Any] | None,
                outcome: JobOutcome, errors: list[str]) -> dict[str, Any]:
    """Assemble the shared record (common brief's format) from the parent's and the job's parts."""
    error = "; ".join([e for e in errors + [outcome.error or ""] if e]) or None
    return {
        "schema": SCHEMA,
        "run_id": records.run_id(config),
        "sweep": str(cfg.sweep_name),
        "status": outcome.status,
        "config": config,
        "predicted": predicted,
        "traced": outcome.traced,
        "measured": outcome.measured,
        "error": error,
        "env": outcome.env or fallback_environment(config["device"]),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


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
        specs: JobSpecs | None = check_job(cfg)
        device = resolve_device(str(cfg.device))
    except UserError as err:
        refuse(err)
    errors: list[str] = []
    try:
        if specs.gpu is None and device == "cuda":
            specs = dataclasses.replace(specs, gpu=detect_gpu())
        config = record_config(cfg, specs, device)
    except Exception as err:  # a bug composing the record: record the config as given, status failed
        config = raw_config(cfg, device)
        errors.append(f"config: {type(err).__name__}: {err}")
        specs = None
    rid = records.run_id(config)
    if rid in records.completed_ids(path, statuses=tuple(cfg.get("resume_skip") or ("ok",))):
        print(f"{position} skip (recorded) {rid} {config['model']} {config['method']['method']}", flush=True)
        _progress("job_skipped", cfg)
        return None
    predicted = None
    if specs is not None:
        try:
            predicted = predicted_block(specs, device, config["memory_cap_bytes"])
        except Exception as err:  # the planner may not cover a combination; the run still tells the truth
            errors.append(f"planner: {type(err).__name__}: {err}")
    problem = runnable(specs, device) if specs is not None else None
    if specs is None or problem:
        outcome = JobOutcome(status="failed", error=problem)
    else:
        outcome = launch(cfg, specs, config)
    record = make_record(cfg, config, predicted, outcome, errors)
    records.append_record(path, record)
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
