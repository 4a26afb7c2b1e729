"""Recipes: named bundles of knobs for the stacks people run (conf/recipe/*.yaml; stdlib + yaml).

A recipe is only defaults: explicit flags (``plan --r 8``) and Hydra overrides (``run method.r=8``) win.
The same file serves both: Hydra composes it for ``lorabench run recipe=NAME`` (a ``_global_`` package that
overrides the method and optimizer groups and sets ``method.*`` / ``train.*``), and :func:`load_recipe`
reads it for ``plan``, ``compare`` and ``trace``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

from lorabench.catalog import CONF_DIR, _load_yaml
from lorabench.errors import UserError, suggest


@dataclass(frozen=True)
class Recipe:
    """One conf/recipe/<name>.yaml.

    Attributes:
        name, description: what ``lorabench recipes`` lists.
        method: the method it selects (None: the user's ``--method``).
        optimizer: the optimizer (or HF ``optim`` alias) it selects, None: the default.
        method_knobs: method-config fields it sets.
        train: TrainSpec fields it sets, ``stack`` among them (:attr:`stack`).
    """

    name: str
    description: str
    method: str | None = None
    optimizer: str | None = None
    method_knobs: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def stack(self) -> str:
        """``TrainSpec.stack`` as the recipe sets it: ``peft`` (transformers + PEFT + bitsandbytes) or
        ``lorabench`` (the default)."""
        return str(self.train.get("stack", "lorabench"))


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def load_recipe(name: str) -> Recipe:
    """Read conf/recipe/<name>.yaml.

    Raises:
        UserError: no such recipe (with close names).
    """
    if name not in recipe_names():
        raise suggest(name, recipe_names(), "recipe")
    doc = _load_yaml(CONF_DIR / "recipe" / f"{name}.yaml")
    groups: dict[str, str] = {}
    for entry in doc.get("defaults") or []:
        for key, value in (entry.items() if isinstance(entry, dict) else []):
            groups[str(key).removeprefix("override ").strip("/")] = str(value)
    meta = doc.get("recipe") or {}
    if meta.get("name") != name:
        raise UserError(f"conf/recipe/{name}.yaml names itself {meta.get('name')!r}", "make recipe.name the file name")
    return Recipe(name=name, description=str(meta.get("description", "")), method=groups.get("method"),
                  optimizer=groups.get("optimizer"), method_knobs=dict(doc.get("method") or {}),
                  train=dict(doc.get("train") or {}))


def check_stack(method: Any, train: Any, hooks: Any) -> None:
    """What ``train.stack`` refuses although the planner could plan it.

    PEFT builds prefix tuning's past key/values as a Cache, which raises "... does not work with gradient
    checkpointing" (docs/SOURCES.md#peft-prefix-ckpt); lorabench's own runtime runs it.

    Raises:
        UserError: prefix tuning with gradient checkpointing on the PEFT stack.
    """
    if train.stack == "peft" and train.gradient_checkpointing and hooks.prefix_tokens(method):
        raise UserError("PEFT refuses prefix tuning with gradient checkpointing (its prefix cache does not work "
                        "with it)", "drop --checkpointing, or plan lorabench's own runtime (--stack lorabench)")


def stack_method(model: Any, method: Any, train: Any) -> Any:
    """The method as ``train.stack`` applies it.

    On the PEFT stack, peft 0.21 on transformers 5 reads ``all-linear`` on an MoE model as also its router and
    fused experts (``target_parameters``, gate_up_proj at rank 2r and alpha 2 alpha since it fuses two
    transformers-4 linears; docs/SOURCES.md#peft-moe-conversion, the model's
    ``traits.peft_all_linear_parameters``), so the plan adapts them too; explicit ``target_parameters`` or
    ``rank_pattern`` entries win. lorabench's own ``all-linear`` means the nn.Linear modules only.

    Raises:
        UserError: dropout or DoRA with that conversion: PEFT's ParamWrapper refuses both (checked against peft).
    """
    if train.stack == "peft" and getattr(method, "experts_path", "fold") != "fold":
        raise UserError("experts_path=routed is lorabench's own expert path; PEFT folds (ParamWrapper)",
                        "drop --experts-path, or plan lorabench's runtime (--stack lorabench)")
    extra = model.traits.peft_all_linear_parameters
    if train.stack != "peft" or not extra or getattr(method, "target_modules", None) != "all-linear" \
            or getattr(method, "target_parameters", "given"):
        return method
    if method.lora_dropout or method.use_dora:
        knob = "lora_dropout != 0" if method.lora_dropout else "DoRA"
        raise UserError(f"PEFT's all-linear on {model.name} also wraps the router and experts with ParamWrapper, "
                        f"which refuses {knob} (peft 0.21, transformers 5)",
                        "pass --lora-dropout 0 (no --use-dora), list the nn.Linear modules in --target-modules, "
                        "or plan lorabench's own runtime (--stack lorabench)")
    paths = {m.name: m.parameter_path for m in model.matrices}
    ranks = tuple(f"{paths[name]}={k * method.r}" for name, k in extra if k != 1)
    alphas = tuple(f"{paths[name]}={k * method.lora_alpha:g}" for name, k in extra if k != 1)
    return dataclasses.replace(method, target_parameters=tuple(paths[name] for name, _ in extra),
                               rank_pattern=tuple(method.rank_pattern or ()) + ranks,
                               alpha_pattern=tuple(method.alpha_pattern or ()) + alphas)


def peft_stack_supports(method: Any) -> bool:
    """Whether lorabench can build ``method`` with PEFT's own modules: LoRA, or QLoRA (NF4, blocksize 64),
    without DoRA."""
    from lorabench.methods.lora.config import LoraConfig
    from lorabench.methods.qlora.config import QLoraConfig

    if type(method) is QLoraConfig:
        return method.blocksize == 64 and not method.use_dora
    return type(method) is LoraConfig and not method.use_dora


def peft_stack_problem(model: Any, method: Any, train: Any, device: str) -> str | None:
    """Why ``lorabench run`` cannot measure this config on the PEFT stack (None when it can): a method PEFT's
    builder does not cover, several GPUs, or 4-bit rows bitsandbytes' CPU kernels get wrong
    (:func:`lorabench.quant.sizes.bnb_cpu_row_problem`)."""
    if not peft_stack_supports(method):
        return (f"train.stack=peft runs LoRA and QLoRA (NF4, blocksize 64, no DoRA) through PEFT, not this "
                f"{method.name} config; use train.stack=lorabench")
    if train.num_gpus > 1:
        return "train.stack=peft runs on one device; use train.stack=lorabench for multi-GPU runs"
    if device == "cpu" and hasattr(method, "double_quant"):
        from lorabench.quant.sizes import bnb_cpu_rows_problem

        problem = bnb_cpu_rows_problem(model)
        if problem:
            return f"{problem}; use device=cuda"
    return None
