"""``lorabench advise``: the fastest (or cheapest) configurations that fit a GPU, the Pareto set of memory vs
time, the exact plan/run command of each, and the nearest configurations that do not fit (torch-free)."""

from __future__ import annotations

import argparse
from typing import Any

from lorabench.catalog import load_gpu, load_model
from lorabench.commands.common import add_cost_args, add_format_arg, add_model_arg, budget_from_args, positive_int
from lorabench.methods import get as get_method
from lorabench.render import render
from lorabench.units import gib, seconds, usd


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("advise", help="search methods and knobs for configurations that fit, ranked by time or cost",
                       description="Search the knob space (method and its knobs, checkpointing, micro-batch x "
                                   "accumulation at a fixed global batch, optimizer, adapter dtype, ZeRO stage) for "
                                   "configurations that fit with headroom; rank by predicted time or cost.")
    add_model_arg(p)
    p.add_argument("--gpu", required=True, help="catalog GPU (h100, a6000, 4090...)")
    p.add_argument("--gpus", dest="num_gpus", type=positive_int, default=1, help="data-parallel GPUs (default 1)")
    p.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--global-batch", type=positive_int, default=32, help="sequences per optimizer step (default 32)")
    p.add_argument("--by", choices=("time", "cost"), default="time", help="rank by step time (default) or cost")
    p.add_argument("--headroom", type=float, default=0.05, help="fraction of GPU memory kept free (default 0.05)")
    p.add_argument("--top", type=positive_int, default=10, help="rows of the ranking to print (default 10)")
    add_format_arg(p)
    add_cost_args(p)
    p.set_defaults(func=run)


def _knobs(c: Any) -> str:
    if c.recipe:
        return f"recipe {c.recipe}"
    d = c.method.to_dict()
    bits = [f"r={d['r']}" if "r" in d else "", "all-linear" if d.get("target_modules") == "all-linear" else "",
            ("+experts" + ("/routed" if d.get("experts_path") == "routed" else "")) if d.get("target_parameters") else "",
            f"{d['backend']}" if d.get("backend") == "bitsandbytes" else "", f"{d['adapter_dtype']} weights"
            if not get_method(c.method.name).estimator.trains_base else ""]
    return " ".join(b for b in bits if b)


def _row(rank: int, c: Any) -> dict[str, str]:
    t = c.train
    row = {"#": str(rank), "method": c.method.name, "knobs": _knobs(c), "ckpt": "yes" if t.gradient_checkpointing else "no",
           "b x accum": f"{t.micro_batch_size} x {t.grad_accum_steps}", "optimizer": t.optimizer.name,
           "memory GiB": gib(c.prediction.device_bytes, 1), "step": seconds(c.step.step_time_s),
           "tokens/s": f"{c.step.tokens_per_s:,.0f}", "MFU": f"{100 * c.step.mfu:.1f}%"}
    if t.num_gpus > 1:
        row["sharding"] = t.sharding
    if c.tokens is not None:
        row["train time"] = seconds(c.train_time_s or 0)
        row["cost"] = usd(c.cost_usd)
    return row


def _json(c: Any, model: Any, gpu: Any) -> dict[str, Any]:
    from lorabench.advise import commands

    plan, runcmd = commands(model, gpu, c)
    return {"method": c.method.to_dict(), "train": c.train.to_record(), "fits": c.fits,
            "device_bytes": c.prediction.device_bytes, "headroom_bytes": c.headroom_bytes,
            "step_time_s": c.step.step_time_s, "tokens_per_s": c.step.tokens_per_s, "mfu": c.step.mfu,
            "train_time_s": c.train_time_s, "cost_usd": c.cost_usd, "plan_command": plan, "run_command": runcmd}


def run(args: argparse.Namespace) -> int:
    from lorabench import advise
    from lorabench.progress import progress_bar

    model, gpu = load_model(args.model), load_gpu(args.gpu)
    budget = budget_from_args(args)
    with progress_bar("advise", unit="combos", enabled=args.format in ("table", "markdown")) as bar:
        result = advise.search(model, gpu, seq_len=args.seq_len, global_batch=args.global_batch,
                               num_gpus=args.num_gpus, headroom=args.headroom, tokens=budget.tokens,
                               usd_per_gpu_hour=budget.usd_per_gpu_hour, by=args.by, progress=bar.update_to)
    if args.format == "json":
        extra = {"model": model.name, "gpu": gpu.name, "searched": result.searched,
                 "configurations": [_json(c, model, gpu) for c in result.ranked],
                 "pareto": [result.ranked.index(c) for c in result.pareto],
                 "near_misses": [dict(_json(c, model, gpu), why=c.why_not(gpu, result.headroom))
                                 for c in result.near_misses]}
        print(render([], "json", extra=extra))
        return 0
    if args.format == "csv":  # one table: every fitting configuration, ranked
        print(render([_row(i + 1, c) for i, c in enumerate(result.ranked)], "csv"))
        return 0
    head = (f"{model.display} on {gpu.name} x{args.num_gpus}: {result.searched} configurations searched, "
            f"{len(result.ranked)} fit with {100 * args.headroom:.0f}% headroom; global batch {args.global_batch} x "
            f"{args.seq_len} tokens; ranked by {args.by}")
    print(head)
    if not result.ranked:
        print("nothing fits: " + "; ".join(c.why_not(gpu, result.headroom) for c in result.near_misses[:1]))
        print("try more GPUs (--gpus), a shorter --seq-len, or a larger GPU")
        return 0
    print(render([_row(i + 1, c) for i, c in enumerate(result.ranked[:args.top])], args.format))
    print("\nPareto set (no other configuration is both faster and smaller):")
    print(render([_row(result.ranked.index(c) + 1, c) for c in result.pareto], args.format))
    print("\nreproduce:")
    for c in result.pareto:
        plan, runcmd = advise.commands(model, gpu, c)
        print(f"  #{result.ranked.index(c) + 1}  {plan}\n       {runcmd}")
    if result.near_misses:
        print("\nnearest that do not fit:")
        for c in result.near_misses:
            print(f"  {c.method.name} {_knobs(c)} b={c.train.micro_batch_size} ckpt={'yes' if c.train.gradient_checkpointing else 'no'} "
                  f"{c.train.optimizer.name} ({seconds(c.step.step_time_s)}/step): {c.why_not(gpu, result.headroom)}")
    return 0
