"""``lorabench compare``: the six methods side by side, the decision table a user reads."""

from __future__ import annotations

import argparse

from lorabench.catalog import load_gpu, load_model
from lorabench.commands.common import add_format_arg, add_model_arg, add_train_args, train_from_args
from lorabench.memory.categories import PLANNER_COMPONENTS
from lorabench.memory.planner import fits, max_micro_batch, predict
from lorabench.methods import METHOD_NAMES, make_config
from lorabench.render import render
from lorabench.units import gib, human_count

SHORT = {"weights": "weights", "quantized_weights": "nf4", "trainable": "trainable", "gradients": "grads",
         "optimizer": "optim", "master_weights": "master", "activations": "activ", "logits": "logits",
         "cuda_context": "ctx", "allocator_slack": "slack"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="all six methods side by side for one model (decision table)")
    add_model_arg(p)
    add_train_args(p)
    add_format_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    gpu = load_gpu(args.gpu or "h100-80gb")
    rows = []
    for name in METHOD_NAMES:
        method = make_config(name)
        train = train_from_args(args, name, model)
        pred = predict(model, method, train, gpu)
        row = {"method": name, "precision": train.precision,
               "trainable": f"{human_count(pred.trainable_params)} ({100 * pred.trainable_params / model.total_params:.2f}%)"}
        row.update({SHORT[c]: gib(pred.components[c], 2) for c in PLANNER_COMPONENTS})
        row["total GiB"] = gib(pred.device_bytes, 2)
        row[f"fits {gpu.name}"] = "yes" if fits(pred, gpu).fits else "no"
        row["max micro-batch"] = str(max_micro_batch(model, method, train, gpu))
        rows.append(row)
    title = (f"{model.display} ({human_count(model.total_params)} params), b={args.micro_batch_size} s={args.seq_len}"
             f"{' ckpt' if args.gradient_checkpointing else ''}, {args.optimizer}, GiB per GPU, verdicts for {gpu.display}")
    print(render(rows, args.format, title=title if args.format in ("table", "markdown") else ""))
    return 0
