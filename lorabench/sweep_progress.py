"""The sweep's progress bar: done/total, ok/oom/failed counts and an ETA from the step-time model.

Hydra's basic launcher runs a sweep's jobs one after the other in one process, so one bar lives across them.
On the first job the grid is expanded the way Hydra's BasicSweeper does it (``hydra.sweeper.params`` and the
command-line overrides saved in the sweep's ``multirun.yaml``), every job's config is composed and its
compute time predicted: (warmup + timed steps) x :func:`lorabench.steptime.model.predict_time` on the job's
GPU, or on the measured CPU entry (conf/cpu/) for CPU jobs. :class:`lorabench.progress.SweepProgress` adds
the per-job overhead (process start, imports, build) learned from the jobs already finished.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from lorabench.progress import SweepProgress

_STATE: dict[str, Any] = {}


def grid_overrides(sweep_dir: Path) -> list[list[str]]:
    """Every job's overrides, in the BasicSweeper's order (cartesian product of the swept values)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    saved = OmegaConf.load(sweep_dir / "multirun.yaml")
    params = [f"{key}={value}" for key, value in (saved.hydra.sweeper.params or {}).items()]
    params += list(saved.hydra.overrides.task)
    lists = []
    for override in OverridesParser.create().parse_overrides(params):
        key = override.get_key_element()
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        lists.append([f"{key}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*lists)]


SpecsOf = Callable[[DictConfig], Any]
"""The sweep's ``build_specs`` (passed in, so this module does not import the sweep back)."""


def predicted_job_seconds(cfg: DictConfig, specs_of: SpecsOf) -> float:
    """(warmup + timed steps) x predicted step time of one job's config (0 when it cannot be predicted)."""
    from lorabench.catalog import _cpu_docs, load_gpu
    from lorabench.steptime.model import predict_time

    try:
        specs = specs_of(cfg)
        device = specs.gpu
        if device is None:
            cpus = list(_cpu_docs())
            device = load_gpu(cpus[0] if cpus and str(cfg.device) != "cuda" else "h100-80gb")
        steps = int(cfg.train.get("warmup_steps", 1)) + int(cfg.train.get("timed_steps", 1))
        return steps * predict_time(specs.model, specs.method, specs.train, device).step_time_s
    except Exception:  # a job the planner does not cover: no prediction, the overhead term still counts it
        return 0.0


def _predictions(cfg: DictConfig, specs_of: SpecsOf) -> list[float]:
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    try:
        combos = grid_overrides(Path(hc.sweep.dir))
        return [predicted_job_seconds(compose(config_name=hc.job.config_name, overrides=combo), specs_of)
                for combo in combos]
    except Exception:  # another sweeper, or compose unavailable: the running job's own prediction
        return [predicted_job_seconds(cfg, specs_of)]


def _state(cfg: DictConfig, specs_of: SpecsOf) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    key = str(HydraConfig.get().sweep.dir)
    if _STATE.get("key") != key:
        from tqdm import tqdm

        if _STATE.get("bar") is not None:
            _STATE["bar"].close()
        progress = SweepProgress(_predictions(cfg, specs_of))
        bar = tqdm(total=progress.total, desc=progress.line(), unit="job", file=sys.stderr, dynamic_ncols=True, mininterval=0,
                   bar_format="sweep {percentage:3.0f}%|{bar}| {desc}")
        _STATE.update(key=key, progress=progress, bar=bar)
    return _STATE


def _show(state: dict[str, Any]) -> None:
    bar, progress = state["bar"], state["progress"]
    bar.set_description_str(progress.line(), refresh=False)
    bar.update(progress.done - bar.n)
    if progress.done >= progress.total:
        bar.close()
        _STATE.clear()


def job_finished(cfg: DictConfig, status: str, wall_s: float, specs_of: SpecsOf) -> None:
    """Hook for the sweep: a job ended with ``status`` after ``wall_s`` seconds."""
    state = _state(cfg, specs_of)
    state["progress"].finished(status, wall_s)
    _show(state)


def job_skipped(cfg: DictConfig, specs_of: SpecsOf) -> None:
    """Hook for the sweep: a job was skipped (already recorded, or excluded)."""
    state = _state(cfg, specs_of)
    state["progress"].skipped()
    _show(state)
