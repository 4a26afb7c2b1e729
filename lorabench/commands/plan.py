"""``lorabench plan``: the predicted memory breakdown, verdicts per GPU, the largest micro-batch."""

from __future__ import annotations

import argparse
from lorabench.catalog import all_gpus
from lorabench.commands import timing
from lorabench.commands.notes import method_notes
from lorabench.commands.common import (add_cost_args, add_format_arg, add_plan_args, budget_from_args, gpu_from_args,
                                      specs_from_args)
from lorabench.memory.categories import PLANNER_COMPONENTS, TRACE_TO_PLANNER
from lorabench.memory.planner import fits, max_micro_batch, predict
from lorabench.render import render
from lorabench.units import gib, human_count


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="predict the memory of a fine-tune (no torch, instant)",
                       description="Predict per-GPU memory by component, the verdict on each GPU, the largest micro-batch.")
    add_plan_args(p)
    add_cost_args(p)
    add_format_arg(p)
    p.add_argument("--explain", action="store_true", help="show each component's formula, numbers and source")
    p.add_argument("--trace", action="store_true", help="also run the fake-tensor tracer and add its column (torch)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, method, train = specs_from_args(args)
    gpu = gpu_from_args(args)
    pred = predict(model, method, train, gpu)
    budget = budget_from_args(args)
    step = timing.predict(model, method, train, gpu) if gpu else None
    traced = _trace(model, method, train) if args.trace else None
    rows = []
    for name in PLANNER_COMPONENTS:
        row = {"component": name, "GiB": gib(pred.components[name], 3)}
        if traced is not None:
            # The tracker cannot tell logits from other activations: one traced number covers both rows.
            row["traced GiB"] = (gib(traced[name], 3) + (" (activations + logits)" if name == "activations" else "")
                                 if name in traced else ("in activations" if name == "logits" else ""))
        rows.append(row)
    total = {"component": "total (device)", "GiB": gib(pred.device_bytes, 3)}
    if traced is not None:
        total["traced GiB"] = ""
    rows.append(total)
    gpus = [gpu] if gpu else all_gpus()
    verdicts = []
    for g in gpus:
        v = fits(pred, g)
        row = {"gpu": g.name, "memory GiB": gib(g.memory_bytes, 1), "fits": "yes" if v.fits else "no",
               "headroom GiB": gib(v.headroom_bytes, 2), "max micro-batch": str(max_micro_batch(model, method, train, g))}
        if v.fits:
            row.update(timing.cells(step if g is gpu and step else timing.predict(model, method, train, g), budget, g))
        verdicts.append(row)
    head = (f"{model.display} ({human_count(model.total_params)} params) | {method.name} | "
            f"trainable {human_count(pred.trainable_params)} ({100 * pred.trainable_params / model.total_params:.3f}%) | "
            f"b={train.micro_batch_size} s={train.seq_len} {train.label}"
            f"{' ckpt' if train.gradient_checkpointing else ''} {train.optimizer.name}"
            f"{f' ({train.adamw_impl})' if train.optimizer.name == 'adamw' and train.adamw_impl != 'foreach' else ''}"
            f"{f' x{train.num_gpus} {train.sharding}' if train.num_gpus > 1 else ''}"
            f"{f' | recipe {args.recipe}' if args.recipe else ''} | peak in {pred.phase}")
    if args.format == "json":
        prediction = pred.to_dict()
        if step is not None and gpu is not None:
            prediction.update(timing.json_fields(step, budget, gpu))
        extra = {"model": model.name, "method": method.to_dict(), "train": train.to_record(),
                 "prediction": prediction, "verdicts": verdicts, "notes": method_notes(model, method, pred)}
        if traced is not None:
            extra["traced"] = traced
        print(render(rows, "json", extra=extra))
        return 0
    if args.format == "csv":
        print(render(rows, "csv"))
        return 0
    print(head)
    print(render(rows, args.format))
    if train.grad_accum_steps > 1:
        print(f"gradient accumulation x{train.grad_accum_steps}: same peak memory (one micro-batch at a time).")
    for note in method_notes(model, method, pred):
        print(note)
    if pred.host_bytes:
        print(f"paged optimizer: {gib(pred.host_bytes)} GiB of states may page to host memory under pressure.")
    if step is not None and gpu is not None:
        print(timing.line(step, budget, gpu))
    print()
    print(render(verdicts, args.format))
    if args.explain:
        from lorabench.memory.explain import explain

        print()
        print(render(explain(model, method, train, pred), args.format))
    return 0


def _trace(model, method, train) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Planner-component view of a trace: tracker categories placed on the component they measure."""
    from lorabench.runtime.trace import trace

    return {TRACE_TO_PLANNER[cat]: n for cat, n in trace(model, method, train).components.items()}
