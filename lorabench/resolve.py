"""The one defaults resolver: what a configuration means when some of it is left out (torch-free).

``plan``, ``compare``, ``trace``, ``advise`` (CLI flags) and ``run`` (a Hydra ``train`` node) hand their
values here, so one configuration means one thing everywhere. A value that is absent or None takes:

* ``precision``: the method's :attr:`~lorabench.methods.registry.Method.default_precision` (full fine-tuning
  ``bf16-mixed``: fp32 master weights under bf16 autocast; the PEFT methods ``bf16``);
* ``attention``: the architecture's (:attr:`~lorabench.specs.ArchTraits.default_attention`: sdpa, eager
  where transformers has no sdpa path, Gemma-2);
* ``adamw_impl``: the one an HF ``optim`` alias implies (``adamw_torch_fused`` -> fused), else ``foreach``;
* ``gradient_checkpointing``: on with ``prepare_kbit`` (PEFT's prepare_model_for_kbit_training turns it on);
* every other field: :class:`~lorabench.specs.TrainSpec`'s own default.
"""

from __future__ import annotations

from typing import Any, Mapping

from lorabench.errors import UserError
from lorabench.methods import get as get_method, make_config
from lorabench.methods.base import MethodConfig
from lorabench.specs import ModelSpec, OptimizerSpec, TrainSpec, resolve_optimizer
from lorabench.validation import train_from_fields

#: TrainSpec fields whose default depends on the method, the model or the optimizer (see the module doc).
RESOLVED_FIELDS: tuple[str, ...] = ("precision", "attention", "adamw_impl")


def resolve_train(values: Mapping[str, Any], method: str, model: ModelSpec,
                  optimizer: str | OptimizerSpec | None = None) -> TrainSpec:
    """A validated TrainSpec from the given fields (None = not given) for ``method`` on ``model``.

    Args:
        values: TrainSpec fields by name (extra runner keys must be removed by the caller).
        optimizer: an optimizer name or HF ``optim`` alias; None means ``values["optimizer"]`` or adamw.

    Raises:
        UserError: an unknown field, a wrong type or value, or an alias contradicting ``adamw_impl``.
    """
    given = {k: v for k, v in values.items() if v is not None}
    opt = given.pop("optimizer", None) if optimizer is None else optimizer
    opt_name = opt.name if isinstance(opt, OptimizerSpec) else str(opt or "adamw")
    name, implied = resolve_optimizer(opt_name)
    explicit = given.get("adamw_impl")
    if explicit and implied and explicit != implied:
        raise UserError(f"optimizer {opt_name} means adamw_impl {implied}, not {explicit}",
                        f"drop adamw_impl (--adamw-impl) or use optimizer {name}")
    given.setdefault("adamw_impl", implied or "foreach")
    if given.get("prepare_kbit"):  # PEFT's prepare_model_for_kbit_training turns gradient checkpointing on
        given["gradient_checkpointing"] = True
    given.setdefault("precision", get_method(method).default_precision)
    given.setdefault("attention", model.traits.default_attention)
    return train_from_fields(given, optimizer=OptimizerSpec(name))


def resolve(model: ModelSpec, method: str, knobs: Mapping[str, Any] | None, train_values: Mapping[str, Any],
            optimizer: str | OptimizerSpec | None = None) -> tuple[MethodConfig, TrainSpec]:
    """(method config, TrainSpec) of one configuration: the method's knobs over its defaults (as the stack
    applies them, :func:`lorabench.recipes.stack_method`), the training fields over :func:`resolve_train`'s."""
    from lorabench.recipes import stack_method

    train = resolve_train(train_values, method, model, optimizer)
    return stack_method(model, make_config(method, knobs), train), train


def resolved_help(field: str) -> str:
    """How a resolved field defaults, for ``--help`` (generated from the registry)."""
    from lorabench.methods import METHODS

    if field == "precision":
        by = {}
        for name, m in METHODS.items():
            by.setdefault(m.default_precision, []).append(name)
        return " (default: " + "; ".join(f"{p} for {', '.join(names)}" for p, names in by.items()) + ")"
    if field == "attention":
        return " (default: sdpa, or eager where transformers has no sdpa path: Gemma-2)"
    if field == "adamw_impl":
        return " (default: the one an HF optim alias implies, fused for adamw_torch_fused; else foreach)"
    return ""
