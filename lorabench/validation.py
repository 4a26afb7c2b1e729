"""Every rule a configuration must satisfy, shared by ``plan``, ``compare``, ``trace`` and ``run`` (stdlib only).

Bad input is refused before anything runs, with one line naming the problem and a fix
(:class:`~lorabench.errors.UserError`, exit code 2 at the CLI). The same functions check a
:class:`~lorabench.specs.TrainSpec` built from CLI flags and one composed by Hydra for the sweep runner, so
``lorabench run train.precision=fp8`` is refused exactly as ``lorabench plan --precision fp8`` is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from lorabench.errors import UserError, require, suggest
from lorabench.specs import PRECISIONS, ModelSpec, OptimizerSpec, TrainSpec

SHARDINGS: tuple[str, ...] = ("none", "zero1", "zero2", "zero3")
ATTENTIONS: tuple[str, ...] = ("sdpa", "eager")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
WEIGHT_DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")
AUTOCASTS: tuple[str, ...] = ("none", "bf16", "fp16")
LOADERS: tuple[str, ...] = ("per-layer", "16bit-first")
STACKS: tuple[str, ...] = ("lorabench", "peft")
"""TrainSpec.stack: lorabench's own modules, or transformers + PEFT + bitsandbytes."""


def _accepts(annotation: str, value: Any) -> bool:
    """Whether ``value`` has a type the (string) annotation of a dataclass field allows.

    ``bool`` is not an ``int`` here (``seq_len=True`` is refused) and an ``int`` is a ``float``.
    """
    checks = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "None": lambda v: v is None,
        "tuple[str, ...]": lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v),
    }
    options = [a.strip() for a in annotation.split("|")]
    known = [checks[a] for a in options if a in checks]
    return not known or len(known) < len(options) or any(check(value) for check in known)


def _type_name(annotation: str) -> str:
    words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "None": "null", "tuple[str, ...]": "a list of names"}
    return " or ".join(words.get(a.strip(), a.strip()) for a in annotation.split("|"))


def check_fields(cls: type, values: Mapping[str, Any], what: str) -> None:
    """Refuse keys ``cls`` (a dataclass) lacks and values of the wrong type, naming the key.

    Raises:
        UserError: ``what`` names the config (``train``, ``method lora``) in the message.
    """
    hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in hints:
            raise suggest(key, hints, f"{what} field")
        if not _accepts(hints[key], value):
            raise UserError(f"{what}.{key}={value!r} is not {_type_name(hints[key])}",
                            f"pass {what}.{key} as {_type_name(hints[key])}")


def train_from_fields(values: Mapping[str, Any], optimizer: str | OptimizerSpec | None = None) -> TrainSpec:
    """A validated TrainSpec from a mapping of its fields (the runner's ``train`` node, a record).

    Raises:
        UserError: an unknown key, a value of the wrong type, or a value the rules below refuse.
    """
    values = dict(values)
    opt = values.pop("optimizer", None) if optimizer is None else optimizer
    check_fields(TrainSpec, values, "train")
    spec = TrainSpec(**values, optimizer=opt if isinstance(opt, OptimizerSpec) else OptimizerSpec(str(opt or "adamw")))
    validate_train(spec)
    return spec


def validate_train(train: TrainSpec) -> None:
    """The rules a TrainSpec obeys on its own (no model needed)."""
    check_fields(TrainSpec, {f.name: getattr(train, f.name) for f in dataclasses.fields(train)
                             if f.name != "optimizer"}, "train")
    for name, value in (("micro_batch_size", train.micro_batch_size), ("seq_len", train.seq_len),
                        ("grad_accum_steps", train.grad_accum_steps), ("num_gpus", train.num_gpus)):
        require(value >= 1, f"{name}={value} must be >= 1", f"pass {name} 1 or more")
    _choice(train.precision, PRECISIONS, "precision")
    _choice(train.attention, ATTENTIONS, "attention")
    _choice(train.sharding, SHARDINGS, "sharding")
    validate_optimizer(train.optimizer)
    from lorabench.memory.optimizer_step import ADAMW_IMPLS

    _choice(train.adamw_impl, ADAMW_IMPLS, "adamw_impl")
    if train.weights_dtype is not None:
        _choice(train.weights_dtype, WEIGHT_DTYPES, "weights_dtype")
    if train.autocast is not None:
        _choice(train.autocast, AUTOCASTS, "autocast")
    _choice(train.loader, LOADERS, "loader")
    _choice(train.stack, STACKS, "stack")
    if train.norm_dtype is not None:
        _choice(train.norm_dtype, WEIGHT_DTYPES, "norm_dtype")
    require(not train.prepare_kbit or train.gradient_checkpointing,
            "prepare_kbit without gradient checkpointing is not what prepare_model_for_kbit_training does",
            "add --checkpointing (train.gradient_checkpointing=true)")
    from lorabench.memory.loss import LOSSES

    _choice(train.loss, LOSSES, "loss")
    require(train.sharding == "none" or train.num_gpus > 1,
            f"sharding {train.sharding} with 1 GPU shards nothing",
            "pass --gpus 2 or more (train.num_gpus), or drop --sharding")


def validate_optimizer(optimizer: OptimizerSpec) -> None:
    from lorabench.specs import OPTIMIZER_NAMES

    _choice(optimizer.name, OPTIMIZER_NAMES, "optimizer")


def validate_setup(model: ModelSpec, method: Any, train: TrainSpec, hooks: Any) -> None:
    """Rules that need the model: the context length, and the method's own checks (``hooks.check``)."""
    validate_train(train)
    limit = model.max_position_embeddings
    if model.position_embedding_params:
        require(train.seq_len <= limit, f"seq_len {train.seq_len} exceeds {model.name}'s {limit} learned positions",
                f"pass --seq-len {limit} or less")
    elif limit and train.seq_len > limit and not train.allow_long_context:
        raise UserError(f"seq_len {train.seq_len} exceeds {model.name}'s max_position_embeddings {limit}",
                        f"pass --seq-len {limit} or less, or --allow-long-context (train.allow_long_context=true) "
                        "to plan a context the model was not trained for")
    require(train.norm_dtype is None or not hooks.trains_base,
            f"norm_dtype {train.norm_dtype} sets the norms of a frozen base; {method.name} trains every weight",
            "drop --norm-dtype (train.norm_dtype), or pick a PEFT method")
    check = getattr(hooks, "check", None)
    if check is not None:
        check(model, method)


def validate_device(device: str) -> None:
    _choice(device, DEVICES, "device")


def _choice(value: Any, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise suggest(str(value), choices, what)


__all__ = ["check_fields", "train_from_fields", "validate_train", "validate_setup", "validate_device",
           "validate_optimizer", "SHARDINGS", "ATTENTIONS", "STACKS", "DEVICES"]
