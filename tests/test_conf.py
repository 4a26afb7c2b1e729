"""The Hydra config groups compose, and their defaults stay equal to the dataclasses they mirror."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lorabench.commands.common import OPTIMIZERS
from lorabench.methods import CONFIGS, METHOD_NAMES
from lorabench.resolve import RESOLVED_FIELDS
from lorabench.specs import OptimizerSpec, TrainSpec

CONF = Path(__file__).resolve().parent.parent / "conf"
RUNNER_TRAIN_KEYS = {"warmup_steps", "timed_steps", "lr"}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        yield lambda overrides=(): compose("config", overrides=list(overrides), return_hydra_config=True)


def test_default_config_composes_with_the_documented_run_settings(hydra_conf) -> None:
    cfg = hydra_conf()
    assert cfg.model.name == "tiny-llama" and cfg.method.name == "lora" and cfg.optimizer.name == "adamw"
    assert "gpu" not in cfg or cfg.gpu is None
    for key in ("device", "seed", "job_timeout_s", "memory_cap_bytes", "trace", "results_dir", "sweep_name"):
        assert key in cfg, key
    assert cfg.device == "auto" and cfg.trace is False and cfg.memory_cap_bytes is None
    assert cfg.hydra.sweep.dir.startswith("results/_scratch/")
    assert cfg.hydra.run.dir.startswith("results/_scratch/")


@pytest.mark.parametrize("group", ["model", "method", "optimizer", "train", pytest.param("gpu", id="gpus"), "sweep"])
def test_every_option_of_every_group_composes(hydra_conf, group: str) -> None:
    options = _options(group)
    assert options, group
    for option in options:
        cfg = hydra_conf([f"{group}={option}"])
        if group in ("model", "method", "optimizer", "gpu"):
            assert cfg[group].name == option


@pytest.mark.parametrize("launcher, target", [
    ("basic", "BasicLauncher"),
    ("joblib", "JoblibLauncher"),
    ("submitit_slurm", "SlurmLauncher"),
    ("local_parallel", "JoblibLauncher"),
    ("slurm", "SlurmLauncher"),
])
def test_launchers_compose(hydra_conf, launcher: str, target: str) -> None:
    cfg = hydra_conf([f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "local_parallel":
        assert cfg.hydra.launcher.n_jobs == 2
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min * 60 > cfg.job_timeout_s


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_yaml_equals_dataclass_defaults(method: str) -> None:
    doc = yaml.safe_load((CONF / "method" / f"{method}.yaml").read_text())
    assert doc.pop("name") == method
    fields = {f.name: f.default for f in dataclasses.fields(CONFIGS[method])}
    assert set(doc) == set(fields), f"{method}.yaml keys differ from {CONFIGS[method].__name__} fields"
    for key, default in fields.items():
        assert default is not dataclasses.MISSING, (method, key)
        value = tuple(doc[key]) if isinstance(doc[key], list) else doc[key]
        assert value == default and type(value) in (type(default), int if type(default) is float else None), \
            (method, key, value, default)


def test_train_default_equals_trainspec_defaults() -> None:
    doc = yaml.safe_load((CONF / "train" / "default.yaml").read_text())
    spec_fields = {f.name: f for f in dataclasses.fields(TrainSpec) if f.name != "optimizer"}
    assert set(doc) - RUNNER_TRAIN_KEYS == set(spec_fields)
    defaults = TrainSpec()
    for key in spec_fields:
        # null: resolved like the CLI's (lorabench.resolve: the method's precision, the architecture's
        # attention, the optimizer's AdamW implementation); every other field repeats TrainSpec's default.
        assert (doc[key] is None) if key in RESOLVED_FIELDS else doc[key] == getattr(defaults, key), key
    assert doc["timed_steps"] >= 1 and doc["warmup_steps"] >= 1 and doc["lr"] > 0


@pytest.mark.parametrize("name", _options("optimizer"))
def test_optimizer_options_are_known(name: str) -> None:
    assert name in OPTIMIZERS
    assert OptimizerSpec(name).states_per_param in (0, 1, 2)


def _grid(cfg) -> list[dict[str, str]]:
    params = dict(cfg.hydra.sweeper.params or {})
    keys = list(params)
    values = [str(params[k]).split(",") for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def test_cpu_smoke_covers_every_method_on_a_tiny_model(hydra_conf) -> None:
    cfg = hydra_conf(["sweep=cpu-smoke"])
    grid = _grid(cfg)
    assert {job["method"] for job in grid} == set(METHOD_NAMES)
    assert cfg.device == "cpu" and cfg.sweep_name == "cpu-smoke" and cfg.model.name.startswith("tiny-")
    assert cfg.train.seq_len <= 128 and len(grid) <= 32


def test_gpu_validate_grid_plans_every_job(hydra_conf) -> None:
    """Every job of the preset composes into valid specs the planner can predict (torch-free, instant)."""
    from lorabench.memory import planner
    from lorabench.sweep import build_specs, is_excluded

    cfg = hydra_conf(["sweep=gpu-validate"])
    assert cfg.device == "cuda" and cfg.gpu.name == "h100-80gb" and cfg.train.precision == "bf16"
    grid = _grid(cfg)
    assert len(grid) == 4 * 6 * 2 * 2 * 2
    kept = []
    for job in grid:
        # What the sweeper's overrides do, without paying ~0.3 s of Hydra composition per job.
        job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        for key, value in job.items():
            if key in ("model", "method"):
                job_cfg[key] = OmegaConf.load(CONF / key / f"{value}.yaml")
            else:
                OmegaConf.update(job_cfg, key, yaml.safe_load(value))
        if is_excluded(job_cfg):
            assert job["model"] == "llama-2-13b" and job["method"] != "qlora"
            continue
        kept.append(job)
        specs = build_specs(job_cfg)
        assert planner.predict(specs.model, specs.method, specs.train, specs.gpu).peak_allocated_bytes > 0
    assert len(kept) == 3 * 6 * 8 + 8
    assert {j["model"] for j in kept if j["method"] == "qlora"} == {
        "qwen2.5-0.5b", "llama-3.2-1b", "llama-2-7b", "llama-2-13b"}


def test_hydra_dirs_are_git_ignored() -> None:
    ignored = (CONF.parent / ".gitignore").read_text().split()
    assert "results/_scratch/" in ignored
    cfg = OmegaConf.load(CONF / "config.yaml")
    assert cfg.hydra.run.dir.startswith("results/_scratch/") and cfg.hydra.sweep.dir.startswith("results/_scratch/")
