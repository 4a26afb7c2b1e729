"""CLI subcommands: one module each, exposing ``register(subparsers)``; heavy imports happen inside ``run``."""

COMMANDS: tuple[str, ...] = ("plan", "compare", "trace", "models", "gpus", "run", "report")
