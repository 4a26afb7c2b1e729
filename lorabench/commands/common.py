"""Flags shared by ``plan``, ``compare``, ``trace`` and ``advise``: model, method knobs, training and hardware.

The method flags are generated from the registered method configs, the training flags from
:class:`~lorabench.specs.TrainSpec` (:mod:`lorabench.knobs`: one flag per field, its help the field's
docstring); values go through the one resolver (:mod:`lorabench.resolve`).
"""

from __future__ import annotations

import argparse
from typing import Any

from lorabench import knobs as kn
from lorabench.catalog import load_gpu, load_model
from lorabench.memory.optimizer_step import ADAMW_IMPLS
from lorabench.errors import UserError
from lorabench.methods import CONFIGS, METHOD_NAMES, MethodConfig, get as get_method, knob_names, make_config
from lorabench.recipes import Recipe, check_stack, load_recipe, stack_method
from lorabench.resolve import RESOLVED_FIELDS, resolve_train, resolved_help
from lorabench.specs import OPTIMIZER_ALIASES, OPTIMIZER_NAMES, PRECISIONS, GpuSpec, ModelSpec, TrainSpec
from lorabench.steptime.cost import BudgetFlags
from lorabench.validation import ATTENTIONS, SHARDINGS, STACKS

OPTIMIZERS = OPTIMIZER_NAMES + tuple(OPTIMIZER_ALIASES)
FORMATS = ("table", "markdown", "json", "csv")

#: Method flags: every field of every registered method config (one flag per field name).
METHOD_KNOBS: list[kn.Knob] = kn.knobs(CONFIGS)
#: Training flags: every TrainSpec field but the optimizer (an OptimizerSpec; ``--optimizer`` takes its name).
TRAIN_KNOBS: list[kn.Knob] = kn.knobs({"": TrainSpec}, skip=("optimizer",))
BUDGET_KNOBS: list[kn.Knob] = kn.knobs({"": BudgetFlags})
TRAIN_CHOICES: dict[str, tuple[str, ...]] = {"precision": PRECISIONS, "attention": ATTENTIONS,
                                              "sharding": SHARDINGS, "adamw_impl": ADAMW_IMPLS,
                                              "weights_dtype": ("fp32", "bf16", "fp16"),
                                              "autocast": ("none", "bf16", "fp16"),
                                              "loader": ("per-layer", "16bit-first"), "loss": ("hf", "chunked"),
                                              "stack": STACKS, "norm_dtype": ("fp32", "bf16", "fp16")}


def _method_defaults(k: kn.Knob) -> str:
    """`` (lora, qlora; default 8)``, or the default per method when they differ."""
    shown = {m: ("none" if v is None else ",".join(v) if isinstance(v, tuple) else str(v).lower()
                 if isinstance(v, bool) else str(v)) for m, v in k.defaults.items()}
    owners = "every method" if len(shown) == len(METHOD_NAMES) else ", ".join(shown)
    if len(set(shown.values())) == 1:
        return f" ({owners}; default {next(iter(shown.values()))})"
    return " (" + "; ".join(f"{m}: default {v}" for m, v in shown.items()) + ")"


def _train_default(k: kn.Knob) -> str:
    if k.name in RESOLVED_FIELDS:
        return resolved_help(k.name)
    default = k.defaults[""]
    return f" (default {str(default).lower() if isinstance(default, bool) else default})"


def add_model_arg(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required,
                        help="catalog name or alias (7b, 70b, llama-3.1-8b...) or a path to a HF config.json")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """The TrainSpec flags (all None when not given: the recipe, then :mod:`lorabench.resolve`, fill them),
    ``--recipe``, the optimizer, and the hardware."""
    g = parser.add_argument_group("training (lorabench.specs.TrainSpec)")
    g.add_argument("--recipe", default=None, metavar="NAME",
                   help="a stack's defaults (conf/recipe/NAME.yaml; `lorabench recipes` lists them); explicit flags win")
    kn.add_knobs(g, TRAIN_KNOBS, help_suffix=_train_default, choices=TRAIN_CHOICES)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None, metavar="OPTIMIZER",
                   help=f"one of {', '.join(OPTIMIZER_NAMES)}, or an HF Trainer optim string "
                        f"({', '.join(OPTIMIZER_ALIASES)}); default adamw")
    h = parser.add_argument_group("hardware")
    h.add_argument("--gpu", default=None, help="catalog GPU (h100, a100-40gb, 4090...); default: every GPU")


def add_method_knobs(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("method knobs (PEFT names and defaults; lorabench.methods.*.config)")
    kn.add_knobs(g, METHOD_KNOBS, help_suffix=_method_defaults)


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    """--model, --method, every method knob, training and hardware flags."""
    add_model_arg(parser)
    parser.add_argument("--method", default=None, choices=METHOD_NAMES, metavar="METHOD",
                        help=f"one of {', '.join(METHOD_NAMES)} (required unless --recipe selects one)")
    add_method_knobs(parser)
    add_train_args(parser)


def method_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """The method knobs given on the command line."""
    return kn.values(args, METHOD_KNOBS)


def train_values(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainSpec fields given on the command line over the recipe's (None where the resolver decides)."""
    recipe = recipe_of(args)
    given = {k.name: getattr(args, k.name, None) for k in TRAIN_KNOBS}
    base = {k.name: recipe.train[k.name] for k in TRAIN_KNOBS if recipe is not None and k.name in recipe.train}
    return {**base, **{k: v for k, v in given.items() if v is not None}}


def recipe_of(args: argparse.Namespace) -> Recipe | None:
    """The ``--recipe`` of the command line, None without one (UserError for an unknown name)."""
    name = getattr(args, "recipe", None)
    return load_recipe(name) if name else None


def method_from_args(args: argparse.Namespace) -> str:
    """--method, else the recipe's method."""
    recipe = recipe_of(args)
    method = getattr(args, "method", None) or (recipe.method if recipe is not None else None)
    if method is None:
        raise UserError("no method given", "pass --method (one of " + ", ".join(METHOD_NAMES) + ") or a --recipe that "
                        "selects one (`lorabench recipes`)")
    return str(method)


def train_from_args(args: argparse.Namespace, method: str, model: ModelSpec) -> TrainSpec:
    """The resolved TrainSpec of ``method`` on ``model``: explicit flags, then the recipe, then
    :func:`lorabench.resolve.resolve_train`'s defaults."""
    recipe = recipe_of(args)
    optimizer = getattr(args, "optimizer", None) or (recipe.optimizer if recipe is not None else None)
    return resolve_train(train_values(args), method, model, optimizer)


def gpu_from_args(args: argparse.Namespace) -> GpuSpec | None:
    return load_gpu(args.gpu) if getattr(args, "gpu", None) else None


def specs_from_args(args: argparse.Namespace) -> tuple[ModelSpec, MethodConfig, TrainSpec]:
    """Resolve the model, the method config (with knobs) and the training spec; UserError on bad input."""
    model = load_model(args.model)
    name = method_from_args(args)
    train = train_from_args(args, name, model)
    method = stack_method(model, make_config(name, knobs_with_recipe(args, name)), train)
    check_stack(method, train, get_method(name).estimator)
    return model, method, train


def knobs_with_recipe(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The recipe's method knobs that ``method`` has, under the explicit knob flags."""
    recipe = recipe_of(args)
    base = {k: v for k, v in (recipe.method_knobs if recipe else {}).items() if k in knob_names(method)}
    return {**base, **method_knobs(args)}


def add_format_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")


def add_cost_args(parser: argparse.ArgumentParser) -> None:
    """--tokens / --dataset-tokens --epochs and --usd-per-hour (generated from steptime.cost.BudgetFlags)."""
    kn.add_knobs(parser.add_argument_group("time and cost (lorabench.steptime.cost.BudgetFlags)"), BUDGET_KNOBS)


def budget_from_args(args: argparse.Namespace) -> Any:
    from lorabench.steptime.cost import TrainingBudget

    v = kn.values(args, BUDGET_KNOBS)
    return TrainingBudget.from_flags(v.get("tokens"), v.get("dataset_tokens"), v.get("epochs"), v.get("usd_per_hour"))


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is one usage line, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value
