"""CLI subcommands: one module each, exposing ``register(subparsers)``; heavy imports happen inside ``run``."""

COMMANDS: tuple[str, ...] = ("plan", "compare", "advise", "trace", "models", "gpus", "recipes", "run", "report",
                             "calibrate")
