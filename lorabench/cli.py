"""``lorabench`` command line. Each subcommand lives in ``lorabench/commands/<name>.py``.

Cold start matters (``lorabench plan`` targets < 0.3 s): this module and the plan/compare/models/gpus
commands import neither torch, transformers nor pandas.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from lorabench.commands import COMMANDS
from lorabench.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (problem + fix) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"lorabench: error: {message}; see `{self.prog} --help`\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lorabench", description="Plan, trace and measure the memory of LLM fine-tuning.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lorabench.commands.{name}")
        except ModuleNotFoundError as err:  # a command whose optional module is absent
            if err.name and err.name.startswith("lorabench.commands"):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["run"]:
        # Hydra parses its own overrides: hand everything after `run` over untouched.
        run_module = importlib.import_module("lorabench.commands.run")
        if hasattr(run_module, "run_hydra") and not {"-h", "--help"} & set(args_list[1:]):
            return _guard(lambda: run_module.run_hydra(args_list[1:]))
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.version:
        from lorabench import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return _guard(lambda: args.func(args))


def _guard(fn) -> int:  # type: ignore[no-untyped-def]
    try:
        return int(fn() or 0)
    except UserError as err:
        sys.stderr.write(f"lorabench: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("lorabench: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
