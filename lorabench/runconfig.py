"""Refuse an invalid run configuration before anything runs (``lorabench run``, ``python -m lorabench.sweep``).

A single run checks its own config (:func:`lorabench.sweep.check_job`) in :func:`lorabench.sweep.run_one`
before predicting or launching.
A multirun is checked as a whole by the :class:`Preflight` Hydra callback (registered in conf/config.yaml):
``on_multirun_start`` expands the grid the way Hydra's basic sweeper does (``hydra.sweeper.params`` from a
preset, then the command line), composes every job that ``sweep_exclude`` keeps, and refuses the sweep at
the first invalid job, so no job of a grid with a typo runs or is recorded.

The rules are the planner's (:mod:`lorabench.validation`): the same TrainSpec checks, the model/method checks,
plus what only the runner needs (a known device, one unsharded process).
"""

from __future__ import annotations

import itertools
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lorabench.errors import UserError


def job_overrides(config: DictConfig) -> list[list[str]]:
    """Every job's override list: ``hydra.sweeper.params`` then the command line (later keys win), expanded
    as a cartesian product (what BasicSweeper.split_arguments computes). ``hydra*`` overrides are dropped
    (they do not change the job's config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
    params += list(OmegaConf.select(config, "hydra.overrides.task") or [])
    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(params):
        key = override.get_key_element()
        if key.lstrip("~+").startswith("hydra"):
            continue
        if override.is_sweep_override():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*choices.values())]


class Preflight(Callback):
    """Hydra callback: compose and check every job of a multirun before the first one starts."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra import compose

        from lorabench.sweep import check_job, is_excluded, refuse

        for overrides in job_overrides(config):
            try:
                cfg = compose(config_name="config", overrides=overrides)
                if not is_excluded(cfg):
                    check_job(cfg)
            except UserError as err:
                refuse(err, where=f"job {' '.join(overrides) or '(defaults)'}: ")
            except Exception as err:  # a composition error Hydra would raise later, for one job
                refuse(UserError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                                 "fix the override"), where=f"job {' '.join(overrides)}: ")
