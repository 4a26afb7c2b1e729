"""``lorabench models``: the model catalog with aliases and exact parameter counts."""

from __future__ import annotations

import argparse

from lorabench.catalog import load_model, model_aliases, model_names
from lorabench.commands.common import add_format_arg
from lorabench.render import render
from lorabench.units import human_count


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list catalog models, aliases and parameter counts")
    p.add_argument("--all", action="store_true", help="include the tiny test models")
    add_format_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = []
    aliases = model_aliases()
    for name in model_names():
        if name.startswith("tiny-") and not args.all:
            continue
        m = load_model(name)
        rows.append({"name": name, "aliases": ", ".join(aliases[name]), "type": m.model_type,
                     "params": f"{m.total_params:,}", "≈": human_count(m.total_params),
                     "layers": str(m.num_layers), "hidden": str(m.hidden_size),
                     "heads (kv)": f"{m.num_heads} ({m.num_kv_heads})", "vocab": str(m.vocab_size)})
    print(render(rows, args.format))
    return 0
