"""``lorabench recipes``: the named stacks ``--recipe`` (and ``run recipe=``) accept, one line each."""

from __future__ import annotations

import argparse

from lorabench.commands.common import add_format_arg
from lorabench.recipes import load_recipe, recipe_names
from lorabench.render import render


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list the recipes (conf/recipe/*.yaml): the stacks people run",
                       description="Recipes are defaults for plan/compare/trace (--recipe NAME) and run (recipe=NAME); "
                                   "explicit flags and overrides win.")
    add_format_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = []
    for name in recipe_names():
        r = load_recipe(name)
        rows.append({"recipe": name, "method": r.method or "(--method)", "optimizer": r.optimizer or "adamw",
                     "description": r.description})
    print(render(rows, args.format))
    return 0
