"""One job of a sweep, composed in the parent (torch-free): specs, the record's ``config``, the prediction.

:mod:`lorabench.sweep` (Hydra multirun) and :mod:`lorabench.campaign` (the prioritized GPU campaign) both
compose a job's Hydra config into a :class:`PreparedJob` here, launch it (:func:`lorabench.sweep.launch_job`)
and record it (:func:`lorabench.sweep.finish_job`), so a job gets the same record and run_id either way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lorabench import records
from lorabench.runtime.probe import detect_gpu

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


def build_specs(cfg: DictConfig) -> JobSpecs:
    """ModelSpec (honouring ``model.hf_config.*`` overrides), MethodConfig, TrainSpec and GpuSpec of a job.

    Raises:
        UserError: unknown model/GPU/optimizer, a knob the method lacks, an invalid value.
    """
    from lorabench.architectures import spec_from_hf_config
    from lorabench.catalog import load_gpu, load_model
    from lorabench.resolve import resolve

    name = str(cfg.model.name)
    catalog_spec = load_model(name)
    hf_config = OmegaConf.to_container(cfg.model.hf_config, resolve=True)
    overrides = {k: v for k, v in hf_config.items() if catalog_spec.hf_config.get(k, object()) != v}
    model = (spec_from_hf_config(hf_config, name=name, display=catalog_spec.display) if overrides else catalog_spec)
    knobs = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k != "name"}
    if cfg.get("recipe"):  # a recipe is only defaults: its knobs that another chosen method lacks do not apply
        from lorabench.methods import knob_names
        from lorabench.recipes import load_recipe

        extra = set(load_recipe(str(cfg.recipe.name)).method_knobs) - set(knob_names(str(cfg.method.name)))
        knobs = {k: v for k, v in knobs.items() if k not in extra}
    train_fields = {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items()
                    if k not in RUNNER_TRAIN_KEYS}
    method, train = resolve(model, str(cfg.method.name), knobs, train_fields, str(cfg.optimizer.name))
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


def job_payload(cfg: DictConfig, specs: JobSpecs, config: dict[str, Any]) -> dict[str, Any]:
    """What the job subprocess needs (:mod:`lorabench.runtime.job`): the config block plus runner settings."""
    return {"config": config, "hf_config": dict(specs.model.hf_config), "lr": float(cfg.train.lr),
            "trace": bool(cfg.trace), "num_threads": cfg.num_threads, "sampler_hz": float(cfg.sampler_hz),
            "gpu": dataclasses.asdict(specs.gpu) if specs.gpu else None}


def runnable(specs: JobSpecs, device: str = "cuda") -> str | None:
    """Why this config cannot be measured on ``device`` (None when it can): what the PEFT stack cannot run
    (:func:`lorabench.recipes.peft_stack_problem`), a world that does not fit (``dist_launch.check_world``), or
    the method's own refusal (``MethodConfig.run_problem``: the bitsandbytes CPU rows problem)."""
    from lorabench.recipes import peft_stack_problem
    from lorabench.runtime.dist_launch import check_world

    if specs.train.stack == "peft":
        problem = peft_stack_problem(specs.model, specs.method, specs.train, device)
        if problem:
            return problem
    return (check_world(specs.train.num_gpus, specs.train.sharding, device)
            or specs.method.run_problem(specs.model, device))


@dataclasses.dataclass
class PreparedJob:
    """One job, composed and predicted in the parent, ready to launch (``specs`` None: its record config
    could not be composed; ``problem``: why it cannot run here; both are recorded failed without launching)."""

    config: dict[str, Any]
    specs: JobSpecs | None
    device: str
    predicted: dict[str, Any] | None = None
    errors: list[str] = dataclasses.field(default_factory=list)
    problem: str | None = None

    @property
    def run_id(self) -> str:
        return records.run_id(self.config)


def prepare_job(cfg: DictConfig, specs: JobSpecs, device: str) -> PreparedJob:
    """The record's ``config`` and the planner's prediction of a checked job (never raises).

    Args:
        cfg: the job's composed Hydra config; specs: its checked specs (``lorabench.sweep.check_job``);
        device: the resolved device (``cpu`` or ``cuda``).
    """
    try:
        if specs.gpu is None and device == "cuda":
            specs = dataclasses.replace(specs, gpu=detect_gpu())
        job = PreparedJob(config=record_config(cfg, specs, device), specs=specs, device=device)
    except Exception as err:  # a bug composing the record: record the config as given, status failed
        return PreparedJob(config=raw_config(cfg, device), specs=None, device=device,
                           errors=[f"config: {type(err).__name__}: {err}"])
    try:
        job.predicted = predicted_block(specs, device, job.config["memory_cap_bytes"])
    except Exception as err:  # the planner may not cover a combination; the run still tells the truth
        job.errors.append(f"planner: {type(err).__name__}: {err}")
    job.problem = runnable(specs, device)
    return job
