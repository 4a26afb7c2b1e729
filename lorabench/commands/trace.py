"""``lorabench trace``: the exact tensor-memory peak of a full-size training step (fake tensors, no GPU),
beside the planner's prediction.

Torch and transformers are imported inside :func:`run` only.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from lorabench.commands.common import add_format_arg, add_plan_args, specs_from_args
from lorabench.errors import UserError
from lorabench.memory.categories import TRACE_CATEGORIES, to_trace_categories
from lorabench.render import render
from lorabench.units import GiB, MiB, human_bytes, human_count, signed_pct

UNITS: tuple[tuple[str, int], ...] = (("GiB", GiB), ("MiB", MiB), ("KiB", 1024))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="trace one training step under fake tensors: exact peak, no GPU (torch)",
                       description="Run two training steps of the full-size model under FakeTensorMode on the "
                                   "CPU device, count every live tensor storage by category and print the peak "
                                   "beside the planner's prediction.")
    add_plan_args(p)
    add_format_arg(p)
    p.add_argument("--top", type=int, default=0, metavar="N",
                   help="also list the N largest activation tensors live at the peak (op, module, shape, dtype)")
    p.add_argument("--by-module", action="store_true",
                   help="also sum the activations live at the peak by the module that made them")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, method, train = specs_from_args(args)
    if args.top < 0:
        raise UserError(f"--top {args.top} is negative", "pass --top 20 for example")
    from lorabench.memory.planner import predict
    from lorabench.runtime.trace import by_module, trace

    from lorabench.progress import elapsed

    keep = args.top > 0 or args.by_module
    stack = _stack(args, method, train)
    train = dataclasses.replace(train, stack=stack)  # the prediction plans the stack that is traced
    with elapsed(f"tracing {model.name} {method.name} (2 fake-tensor steps)", enabled=args.format in ("table", "markdown")):
        result = trace(model, method, train, keep_storages=keep, stack=stack)
    pred = predict(model, method, train)
    predicted = to_trace_categories(pred.components)
    rows = comparison_rows(predicted, result.components, pred.peak_allocated_bytes, result.peak_bytes)
    activations = [s for s in result.peak_storages if s.category == "activations"]
    if args.format == "json":
        extra: dict[str, Any] = {"model": model.name, "method": method.to_dict(), "traced": result.to_dict(),
                                 "phase_peak_bytes": result.phase_peak_bytes, "predicted_phase": pred.phase,
                                 "note": result.note, "stack": stack}
        if args.top:
            extra["peak_tensors"] = [_tensor_row(s, raw=True) for s in activations[:args.top]]
        if args.by_module:
            extra["by_module"] = by_module(activations)
        print(render(rows, "json", extra=extra))
        return 0
    if args.format in ("table", "markdown"):
        print(f"{model.display} ({human_count(model.total_params)} params) | {method.name} | "
              f"b={train.micro_batch_size} s={train.seq_len} {train.label}"
              f"{' ckpt' if train.gradient_checkpointing else ''} {train.attention} {train.optimizer.name} | "
              f"{stack} modules | traced peak in {result.phase}, predicted in {pred.phase} | trace {result.seconds:.1f} s")
    print(render(rows, args.format))
    if args.format in ("table", "markdown"):
        print("traced peak per phase: " + ", ".join(f"{phase} {human_bytes(n)}"
                                                    for phase, n in result.phase_peak_bytes.items()))
    if args.top:
        print()
        print(render([_tensor_row(s) for s in activations[:args.top]], args.format,
                     title=f"largest activation tensors live at the peak ({len(activations)} in all)"))
    if args.by_module:
        print()
        modules = [{"made by": k, "size": human_bytes(v), "bytes": str(v)} for k, v in by_module(activations).items()]
        print(render(modules, args.format, title="activations live at the peak, by module (layers folded)"))
    if args.format in ("table", "markdown"):
        print()
        print(f"note: {result.note}")
    return 0


def _stack(args: argparse.Namespace, method: Any, train: Any) -> str:
    """The modules to trace: ``train.stack`` (``--stack``, else the recipe's); a PEFT recipe's stack falls back
    to lorabench's modules for a method the PEFT builder does not translate (an explicit ``--stack peft``
    refuses it)."""
    from lorabench.recipes import peft_stack_supports

    if train.stack != "peft" or peft_stack_supports(method):
        return str(train.stack)
    if args.stack is not None:
        raise UserError(f"--stack peft traces LoRA and QLoRA (NF4, blocksize 64, no DoRA) only, not {method.name}",
                        "use --stack lorabench (the default) for the other methods")
    return "lorabench"


def comparison_rows(predicted: dict[str, int], traced: dict[str, int], predicted_peak_bytes: int,
                    traced_peak_bytes: int) -> list[dict[str, str]]:
    """One row per tracker category plus the peak: predicted, traced, difference and signed %.

    One unit for the whole table, GiB unless the traced peak is under 1 GiB (then MiB, or KiB under 1 MiB).
    """
    unit, size = next((u, s) for u, s in UNITS if traced_peak_bytes >= s or s == UNITS[-1][1])

    def row(name: str, predicted_bytes: int, traced_bytes: int) -> dict[str, str]:
        return {"category": name, f"predicted {unit}": f"{predicted_bytes / size:.3f}",
                f"traced {unit}": f"{traced_bytes / size:.3f}",
                f"diff {unit}": f"{(predicted_bytes - traced_bytes) / size:+.3f}",
                "diff %": signed_pct(predicted_bytes, traced_bytes)}

    rows = [row(cat, predicted.get(cat, 0), traced.get(cat, 0)) for cat in TRACE_CATEGORIES]
    rows.append(row("peak (allocated)", predicted_peak_bytes, traced_peak_bytes))
    return rows


def _tensor_row(s: Any, raw: bool = False) -> dict[str, Any]:
    shape = list(s.shape) if raw else "x".join(map(str, s.shape)) or "scalar"
    return {"op": s.op, "module": s.module or f"({s.phase})", "shape": shape, "dtype": str(s.dtype).replace("torch.", ""),
            "bytes": s.nbytes if raw else human_bytes(s.nbytes), "phase": s.phase}
