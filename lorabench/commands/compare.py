"""``lorabench compare``: the six methods side by side on one GPU, the decision table a user reads.

Per method: memory, whether it fits, the largest micro-batch, predicted step time, tokens/s, MFU and, with
``--tokens``, time to train and cost; then the ratios the methods declare (:attr:`MethodConfig.PAIRINGS`:
full fine-tuning vs LoRA, QLoRA vs LoRA with the same targets). ``--breakdown`` adds the memory components.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from lorabench.catalog import load_gpu, load_model
from lorabench.commands import timing
from lorabench.commands.common import (add_cost_args, add_format_arg, add_model_arg, add_train_args, budget_from_args,
                                      knobs_with_recipe, train_from_args)
from lorabench.memory.categories import PLANNER_COMPONENTS
from lorabench.memory.planner import fits, max_micro_batch, predict
from lorabench.methods import CONFIGS, METHOD_NAMES, PAIRINGS, make_config
from lorabench.recipes import stack_method
from lorabench.render import render
from lorabench.steptime.cost import summary
from lorabench.units import gib, human_count

SHORT = {"weights": "weights", "quantized_weights": "nf4", "trainable": "trainable", "gradients": "grads",
         "optimizer": "optim", "master_weights": "master", "optimizer_temp": "opt tmp", "activations": "activ", "logits": "logits",
         "cuda_context": "ctx", "allocator_slack": "slack"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="all six methods side by side on one GPU: memory, fit, speed, cost")
    add_model_arg(p)
    add_train_args(p)
    add_cost_args(p)
    p.add_argument("--breakdown", action="store_true", help="also show the memory components")
    add_format_arg(p)
    p.set_defaults(func=run)


def specs(model: Any, name: str, args: argparse.Namespace, knobs: dict | None = None) -> tuple[Any, Any]:
    """(method config, TrainSpec) of one compare row: the method's defaults under the recipe's knobs and
    ``knobs``, the shared training flags resolved for that method (:mod:`lorabench.resolve`)."""
    train = train_from_args(args, name, model)
    return stack_method(model, make_config(name, {**knobs_with_recipe(args, name), **(knobs or {})}), train), train


def _evaluate(model: Any, name: str, args: argparse.Namespace, gpu: Any, budget: Any, knobs: dict | None = None) -> dict:
    method, train = specs(model, name, args, knobs)
    pred = predict(model, method, train, gpu)
    step = timing.predict(model, method, train, gpu)
    return {"method": method, "train": train, "pred": pred, "step": step, "fits": fits(pred, gpu).fits,
            "max_micro_batch": max_micro_batch(model, method, train, gpu)}


def _row(model: Any, ev: dict, gpu: Any, budget: Any, breakdown: bool) -> dict[str, str]:
    pred, method = ev["pred"], ev["method"]
    row = {"method": ev.get("label", method.name), "precision": ev["train"].precision,
           "trainable": f"{human_count(pred.trainable_params)} ({100 * pred.trainable_params / model.total_params:.2f}%)"}
    if breakdown:
        row.update({SHORT[c]: gib(pred.components[c], 2) for c in PLANNER_COMPONENTS})
    row["total GiB"] = gib(pred.device_bytes, 2)
    row[f"fits {gpu.name}"] = "yes" if ev["fits"] else "no"
    row["max micro-batch"] = str(ev["max_micro_batch"])
    row.update(timing.cells(ev["step"], budget, gpu))
    return row


def _row_json(ev: dict, gpu: Any, budget: Any) -> dict[str, Any]:
    """A row with numbers as numbers: bytes (int), GiB (float), the verdict (bool), the step-time fields."""
    pred = ev["pred"]
    row: dict[str, Any] = {"method": ev["method"].name, "precision": ev["train"].label,
                           "trainable_params": pred.trainable_params}
    row.update({f"{c}_bytes": pred.components[c] for c in PLANNER_COMPONENTS})
    row.update({"total_bytes": pred.device_bytes, "total GiB": pred.device_bytes / 1024**3,
                f"fits {gpu.name}": bool(ev["fits"]), "max micro-batch": ev["max_micro_batch"]})
    row.update(summary(ev["step"], budget, gpu))
    return row


def ratios(model: Any, args: argparse.Namespace, gpu: Any, budget: Any, evals: dict[str, dict]) -> list[str]:
    """The ratio lines the methods declare (:data:`lorabench.methods.PAIRINGS`): memory and step time of
    ``left`` vs ``right`` (QLoRA vs LoRA on QLoRA's targets, full fine-tuning vs LoRA)."""

    def pct(a: float, b: float) -> str:
        return f"{100 * (a / b - 1):+.0f}%"

    lines = []
    for p in PAIRINGS:
        if not p.in_compare or p.left not in evals or p.right not in evals:
            continue
        left, right, where = evals[p.left], evals[p.right], "default targets"
        if p.same_targets:
            targets = left["method"].target_modules
            right = _evaluate(model, p.right, args, gpu, budget, {"target_modules": targets})
            where = f"both on {targets} targets"
        lines.append(f"{p.title} ({where}): memory {pct(left['pred'].device_bytes, right['pred'].device_bytes)}, "
                     f"step time {pct(left['step'].step_time_s, right['step'].step_time_s)}")
    return lines


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    gpu = load_gpu(args.gpu or "h100-80gb")
    budget = budget_from_args(args)
    evals = {name: _evaluate(model, name, args, gpu, budget) for name in METHOD_NAMES}
    for name in METHOD_NAMES:  # variants a method config declares (lora: dora = use_dora), after the methods
        for label, knobs in CONFIGS[name].compare_variants(model).items():
            evals[label] = {**_evaluate(model, name, args, gpu, budget, knobs), "label": label}
    rows = [_row(model, ev, gpu, budget, args.breakdown) for ev in evals.values()]
    notes = ratios(model, args, gpu, budget, evals)
    if args.format == "json":
        extra = {"model": model.name, "gpu": gpu.name, "ratios": notes,
                 "methods": [{"method": ev["method"].to_dict(), "train": ev["train"].to_record(),
                              "prediction": {**ev["pred"].to_dict(), **timing.json_fields(ev["step"], budget, gpu)},
                              "fits": ev["fits"], "max_micro_batch": ev["max_micro_batch"]} for ev in evals.values()]}
        print(render([_row_json(ev, gpu, budget) for ev in evals.values()], "json", extra=extra))
        return 0
    shared = next(iter(evals.values()))["train"]
    title = (f"{model.display} ({human_count(model.total_params)} params), b={shared.micro_batch_size} s={shared.seq_len}"
             f"{' ckpt' if shared.gradient_checkpointing else ''}, {args.optimizer or 'adamw'}"
             f"{f', recipe {args.recipe}' if args.recipe else ''}, GiB per GPU, on {gpu.display}")
    print(render(rows, args.format, title=title if args.format in ("table", "markdown") else ""))
    if args.format in ("table", "markdown"):
        print()
        print("\n".join(notes))
        print(f"(time model: {timing.calibration.load(gpu.name).source or 'calibrated'})")
    return 0
