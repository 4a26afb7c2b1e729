"""``lorabench plan``: the predicted memory breakdown, verdicts per GPU, the largest micro-batch."""

from __future__ import annotations

import argparse
import csv
import io
from typing import Any

from lorabench.catalog import all_gpus
from lorabench.commands import timing
from lorabench.commands.notes import method_notes
from lorabench.commands.common import (add_cost_args, add_format_arg, add_plan_args, budget_from_args, gpu_from_args,
                                      specs_from_args)
from lorabench.memory.categories import PLANNER_COMPONENTS, TRACE_TO_PLANNER
from lorabench.memory.planner import fits, max_micro_batch, predict
from lorabench.render import render
from lorabench.steptime.cost import summary
from lorabench.units import GiB, gib, human_count


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
    checks = _verdicts(model, method, train, pred, [gpu] if gpu else all_gpus(), gpu, step, budget)
    verdicts = [_verdict_cells(c) for c in checks]
    head = (f"{model.display} ({human_count(model.total_params)} params) | {method.name} | "
            f"trainable {human_count(pred.trainable_params)} ({100 * pred.trainable_params / model.total_params:.3f}%) | "
            f"b={train.micro_batch_size} s={train.seq_len} {train.label}"
            f"{' ckpt' if train.gradient_checkpointing else ''} {train.optimizer.name}"
            f"{f' ({train.adamw_impl})' if train.optimizer.name == 'adamw' and train.adamw_impl != 'foreach' else ''}"
            f"{f' x{train.num_gpus} {train.sharding}' if train.num_gpus > 1 else ''}"
            f"{f' | recipe {args.recipe}' if args.recipe else ''} | peak in {pred.phase}")
    explained = None
    if args.explain:
        from lorabench.memory.explain import explain

        explained = explain(model, method, train, pred)
    if args.format == "json":
        prediction = pred.to_dict()
        if step is not None and gpu is not None:
            prediction.update(timing.json_fields(step, budget, gpu))
        extra = {"model": model.name, "method": method.to_dict(), "train": train.to_record(),
                 "recipe": args.recipe, "prediction": prediction, "verdicts": [_verdict_json(c) for c in checks],
                 "notes": method_notes(model, method, pred, train)}
        if traced is not None:
            extra["traced"] = traced
        if explained is not None:
            extra["explain"] = explained
        print(render(_component_json(pred, traced), "json", extra=extra))
        return 0
    if args.format == "csv":
        print(_csv(pred, traced, checks, explained))
        return 0
    print(head)
    print(render(rows, args.format))
    if train.grad_accum_steps > 1:
        print(f"gradient accumulation x{train.grad_accum_steps}: same peak memory (one micro-batch at a time).")
    for note in method_notes(model, method, pred, train):
        print(note)
    if pred.host_bytes:
        print(f"paged optimizer: {gib(pred.host_bytes)} GiB of states may page to host memory under pressure.")
    if step is not None and gpu is not None:
        print(timing.line(step, budget, gpu))
    print()
    print(render(verdicts, args.format))
    if explained is not None:
        print()
        print(render(explained, args.format))
        if step is not None and gpu is not None:
            print()
            print(render(timing.explain_rows(step, gpu), args.format))
    return 0


def _verdicts(model, method, train, pred, gpus, chosen, step, budget) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """One entry per GPU: the GPU, the verdict, the largest micro-batch and (when it fits) the step time."""
    out = []
    for g in gpus:
        v = fits(pred, g)
        time_ = (step if g is chosen and step else timing.predict(model, method, train, g)) if v.fits else None
        out.append({"gpu": g, "verdict": v, "max_micro_batch": max_micro_batch(model, method, train, g),
                    "step": time_, "budget": budget})
    return out


def _verdict_cells(c: dict[str, Any]) -> dict[str, str]:
    g, v = c["gpu"], c["verdict"]
    row = {"gpu": g.name, "memory GiB": gib(g.memory_bytes, 1), "fits": "yes" if v.fits else "no",
           "headroom GiB": gib(v.headroom_bytes, 2), "max micro-batch": str(c["max_micro_batch"])}
    if c["step"] is not None:
        row.update(timing.cells(c["step"], c["budget"], g))
    return row


def _verdict_json(c: dict[str, Any]) -> dict[str, Any]:
    """A verdict with numbers as numbers: bytes (int), GiB (float), fits (bool)."""
    g, v = c["gpu"], c["verdict"]
    row: dict[str, Any] = {"gpu": g.name, "memory_bytes": g.memory_bytes, "memory GiB": g.memory_bytes / GiB,
                           "fits": v.fits, "headroom_bytes": v.headroom_bytes, "headroom GiB": v.headroom_bytes / GiB,
                           "max micro-batch": c["max_micro_batch"]}
    if c["step"] is not None:
        row.update(summary(c["step"], c["budget"], g))
    return row


def _component_json(pred: Any, traced: dict[str, int] | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in PLANNER_COMPONENTS:
        row: dict[str, Any] = {"component": name, "bytes": pred.components[name], "GiB": pred.components[name] / GiB}
        if traced is not None:
            row["traced_bytes"] = traced.get(name)
        rows.append(row)
    rows.append({"component": "total (device)", "bytes": pred.device_bytes, "GiB": pred.device_bytes / GiB})
    return rows


def _csv(pred: Any, traced: dict[str, int] | None, checks: list[dict[str, Any]],
         explained: list[dict[str, str]] | None) -> str:
    """One CSV table: component rows (kind=component, bytes and GiB), verdict rows (kind=verdict, one per GPU,
    fits true/false) and with --explain the explain rows (kind=explain)."""
    rows = [{"kind": "component", "name": r["component"], **{k: v for k, v in r.items() if k != "component"}}
            for r in _component_json(pred, traced)]
    rows += [{"kind": "verdict", "name": r["gpu"], **{k: v for k, v in r.items() if k != "gpu"}}
             for r in map(_verdict_json, checks)]
    rows += [{"kind": "explain", "name": r["component"], **{k: v for k, v in r.items() if k != "component"}}
             for r in explained or []]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: (str(v).lower() if isinstance(v, bool) else v) for k, v in r.items()} for r in rows)
    return buf.getvalue().rstrip("\n")


def _trace(model, method, train) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Planner-component view of a trace: tracker categories placed on the component they measure."""
    from lorabench.runtime.trace import trace

    return {TRACE_TO_PLANNER[cat]: n for cat, n in trace(model, method, train).components.items()}
