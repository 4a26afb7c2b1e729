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


def compose_problem(argv: list[str]) -> str | None:
    """Why Hydra cannot compose the command line's first job (an unknown key or group option, a malformed
    override), as one line; None when it composes. Hydra's own flags (``--cfg``, ``-m``...) are left out;
    a sweep override is checked with its first value (the Preflight callback checks every job later)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lorabench.sweep import CONF_DIR

    overrides = [a for a in argv if not a.startswith("-")]
    if len(overrides) != len(argv) - sum(a in ("-m", "--multirun") for a in argv):
        return None  # other Hydra flags (--cfg, --info, -c...): let Hydra handle the command line
    try:
        first = []
        for override in OverridesParser.create().parse_overrides(overrides):
            value = (next(iter(override.sweep_string_iterator())) if override.is_sweep_override()
                     else override.get_value_element_as_str())
            first.append(f"{override.get_key_element()}={value}" if override.value() is not None or
                         override.is_sweep_override() else override.input_line)
        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            compose(config_name="config", overrides=first, return_hydra_config=True)
    except Exception as err:  # Hydra's composition and parse errors
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return " ".join(lines).split(" Config search path")[0][:300] or type(err).__name__
    finally:
        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
    return None
