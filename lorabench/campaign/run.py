"""Run the campaign: check every job, then validate -> probes -> perf inside one time budget, resumable.

Every job is composed by Hydra from the preset plus its overrides (exactly as ``lorabench run`` would),
checked before anything runs (:func:`lorabench.sweep.check_job`: one line and exit 2 for a bad job),
launched through the sweep's own :func:`lorabench.sweep.launch_job` (the fork-per-job server by default)
and recorded by :func:`lorabench.sweep.finish_job` into ``<results>/<sweep>/records.jsonl``, then copied at
once to ``<out>/<sweep>.records.jsonl``: a command killed at any point returns every finished record.
Jobs already recorded with a status in ``resume_skip`` are skipped, so a second call does what is missing.

The last line is ``campaign: N ok, M oom, K failed, overhead median X s/job, elapsed Y s`` (K counts every
status other than ok and oom: failed, timeout, nan); overhead = job wall - model build - steps.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from lorabench import records
from lorabench.campaign import plan
from lorabench.campaign.clock import Clock
from lorabench.errors import UserError

STAGES: tuple[str, ...] = ("validate", "probes", "perf")
#: When the first this-many jobs of a call all fail (e.g. no working CUDA), the call stops at once.
FIRST_FAILURES_ABORT = 3
ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Settings:
    """How one campaign call runs (the command line of ``python -m lorabench.campaign``)."""

    preset: str
    results_dir: Path
    out_dir: Path
    budget_s: float
    started_at: float
    extra: tuple[str, ...] = ()


@dataclasses.dataclass
class Tally:
    statuses: Counter = dataclasses.field(default_factory=Counter)
    overheads_s: list[float] = dataclasses.field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        self.statuses[record["status"]] += 1
        overhead = (record.get("measured") or {}).get("job_overhead_s")
        if overhead is not None:
            self.overheads_s.append(float(overhead))

    def summary(self, elapsed_s: float) -> str:
        ok, oom = self.statuses["ok"], self.statuses["oom"]
        failed = sum(self.statuses.values()) - ok - oom
        median = f"{statistics.median(self.overheads_s):.2f}" if self.overheads_s else "-"
        return (f"campaign: {ok} ok, {oom} oom, {failed} failed, overhead median {median} s/job, "
                f"elapsed {elapsed_s:.0f} s")


def compose(settings: Settings, overrides: tuple[str, ...]) -> DictConfig:
    """The job's config: conf/config.yaml + ``sweep=<preset>`` + the call's extras + the job's overrides.

    Hydra composes once per distinct config-group choice (``model=``, ``method=``, ...: ~0.3 s each on a busy
    CPU); the job's value overrides (``train.seq_len=64``, ``memory_cap_bytes=...``) are then set on a copy,
    which gives the config Hydra would compose with them, at a fraction of the cost.
    """
    groups = tuple(o for o in overrides if o.split("=", 1)[0] in _GROUPS)
    key = (settings.preset, settings.extra, groups)
    if key not in _COMPOSED:
        from hydra import compose as hydra_compose

        _COMPOSED[key] = hydra_compose("config", overrides=[f"sweep={settings.preset}", *settings.extra, *groups])
    cfg = copy.deepcopy(_COMPOSED[key])
    for item in overrides:
        name, value = item.split("=", 1)
        if name not in _GROUPS:
            OmegaConf.update(cfg, name, yaml.safe_load(value), merge=False)
    return cfg


#: Config groups (selected by name, composed by Hydra); every other override is a value.
_GROUPS = ("model", "method", "optimizer", "train", "gpu", "sweep", "recipe")
_COMPOSED: dict[tuple, DictConfig] = {}


def campaign_node(settings: Settings) -> dict[str, Any]:
    cfg = compose(settings, ())
    node = cfg.get("campaign")
    if node is None:
        raise UserError(f"sweep preset {settings.preset!r} has no campaign node", "use sweep=gpu-campaign")
    return dict(OmegaConf.to_container(node, resolve=True))


def plan_probes(settings: Settings, campaign: dict[str, Any], device: str, gpu: Any) -> list[plan.CampaignJob]:
    """Stage 2: compose one config per (model, method) of the probe grid, vary its shape, pick the probes."""
    from lorabench.memory.planner import calibration
    from lorabench.sweep import build_specs

    grid, bases = [], {}
    for overrides in plan.probe_grid_overrides(campaign):
        key = overrides[:2]
        if key not in bases:
            bases[key] = build_specs(compose(settings, key))
        specs = bases[key]
        values = dict(o.split("=", 1) for o in overrides[2:])
        train = dataclasses.replace(specs.train, micro_batch_size=int(values["train.micro_batch_size"]),
                                    seq_len=int(values["train.seq_len"]),
                                    gradient_checkpointing=values["train.gradient_checkpointing"] == "true")
        grid.append((overrides, dataclasses.replace(specs, train=train, gpu=specs.gpu or gpu)))
    if campaign.get("probe_caps_bytes"):
        caps = [int(c) for c in campaign["probe_caps_bytes"]]
    else:
        context = int(calibration(gpu.name if gpu else None)["cuda_context_bytes"])
        caps = plan.card_caps_bytes(campaign["probe_cards"], context)
    picks = plan.pick_probes(plan.probe_candidates(grid, device), caps, float(campaign["probe_margin"]))
    return plan.probe_jobs(picks, campaign["probes_sweep"])


def plan_jobs(settings: Settings, campaign: dict[str, Any], device: str, gpu: Any) -> list[plan.CampaignJob]:
    """Every record job of the campaign in priority order: validate, then the probes (inside a Hydra context)."""
    return plan.validation_jobs(campaign) + plan_probes(settings, campaign, device, gpu)


def check_all(settings: Settings, jobs: list[plan.CampaignJob]) -> list[tuple[plan.CampaignJob, DictConfig, Any]]:
    """Compose and check every job before anything runs (UserError names the first bad one)."""
    from lorabench.sweep import check_job

    checked = []
    for job in jobs:
        cfg = compose(settings, job.overrides)
        try:
            checked.append((job, cfg, check_job(cfg)))
        except UserError as err:
            raise UserError(f"campaign job {job.label()}: {err.problem}", err.fix) from None
    return checked


def copy_out(out_dir: Path, sweep_name: str, record: dict[str, Any]) -> None:
    """Append the record to ``<out>/<sweep>.records.jsonl`` at once (what a killed command still returns)."""
    records.append_record(out_dir / f"{sweep_name}.records.jsonl", record)


def run_record_jobs(settings: Settings, checked: list, clock: Clock, tally: Tally, scratch: Path) -> None:
    """Stages 1 and 2: each job in order unless recorded (resume) or past its stage's deadline."""
    from lorabench.jobs import prepare_job
    from lorabench.runtime.probe import resolve_device
    from lorabench.sweep import finish_job, launch_job, progress_line
    from lorabench.sweep_progress import predicted_job_seconds

    deferred: Counter = Counter()
    done: dict[Path, set[str]] = {}  # run_ids recorded with a resume_skip status, read once per records file
    for k, (job, cfg, specs) in enumerate(checked, 1):
        path = settings.results_dir / job.sweep_name / "records.jsonl"
        if path not in done:
            done[path] = records.completed_ids(path, statuses=tuple(cfg.get("resume_skip") or ("ok",)))
        prepared = prepare_job(cfg, specs, resolve_device(str(cfg.device)))
        if prepared.run_id in done[path]:
            continue
        compute_s = predicted_job_seconds(cfg, lambda _cfg, checked_specs=specs: checked_specs)
        if not clock.may_start(clock.estimate_s(compute_s), clock.deadline_s(job.stage, STAGES)):
            deferred[job.stage] += 1
            continue
        cfg.job_timeout_s = clock.job_timeout_s(float(cfg.job_timeout_s))
        t0 = time.perf_counter()
        record = finish_job(cfg, prepared, launch_job(cfg, prepared, scratch / f"job-{k:03d}"), path)
        wall_s = time.perf_counter() - t0
        copy_out(settings.out_dir, job.sweep_name, record)
        clock.observe(wall_s, compute_s)
        tally.add(record)
        print(f"{job.stage} {progress_line(k, len(checked), record, wall_s)}", flush=True)
        if sum(tally.statuses.values()) == FIRST_FAILURES_ABORT and not (tally.statuses["ok"] + tally.statuses["oom"]):
            print(f"campaign: the first {FIRST_FAILURES_ABORT} jobs all failed; stopping (their errors are above)",
                  flush=True)
            return
    for stage, n in deferred.items():
        print(f"{stage}: {n} jobs left for the next call (time budget)", flush=True)


def run_perf(settings: Settings, campaign: dict[str, Any], clock: Clock) -> str:
    """Stage 3: scripts/bench_qlora.py into ``<out>/bench_qlora.json`` (skipped when already collected)."""
    if (settings.results_dir / "gpu-campaign" / "bench_qlora.json").exists():
        return "perf: skip (results/gpu-campaign/bench_qlora.json already collected)"
    left_s = clock.hard_end_s() - clock.elapsed_s()
    if left_s < float(campaign["perf_min_s"]):
        return f"perf: left for the next call ({left_s:.0f} s left, needs {campaign['perf_min_s']} s)"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_qlora.py"), "--out", str(settings.out_dir / "bench_qlora.json"),
           *[str(a) for a in campaign["perf_args"]]]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, timeout=left_s, stdin=subprocess.DEVNULL)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired:
        status = "killed at the time budget"
    return f"perf: {status} in {time.perf_counter() - t0:.0f} s"


def run_campaign(settings: Settings) -> Tally:
    """The whole campaign (see the module docstring); returns the tally whose summary is the last line."""
    from hydra import initialize_config_dir

    from lorabench.runtime.probe import detect_gpu, resolve_device
    from lorabench.sweep import CONF_DIR

    settings.out_dir.mkdir(parents=True, exist_ok=True)
    tally = Tally()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        campaign = campaign_node(settings)
        device = resolve_device(str(compose(settings, ()).device))
        gpu = detect_gpu() if device == "cuda" else None
        checked = check_all(settings, plan_jobs(settings, campaign, device, gpu))
        print(f"campaign: {len(checked)} record jobs checked ({device}, preset {settings.preset}) "
              f"in {time.time() - settings.started_at:.0f} s", flush=True)
        clock = Clock(settings.budget_s, dict(campaign["reserve_s"]), float(campaign["finish_s"]),
                      settings.started_at, float(campaign["overhead_guess_s"]))
        from lorabench.runtime import jobserver

        preload = [m for _, _, specs in checked for m in jobserver.preload_for(specs.model, specs.method)]
        print(f"job server: imports in {jobserver.shared().start(preload):.1f} s (once)", flush=True)
        run_record_jobs(settings, checked, clock, tally, settings.out_dir.parent / "campaign-jobs")
        print(run_perf(settings, campaign, clock), flush=True)
    return tally
