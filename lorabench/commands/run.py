"""``lorabench run [hydra overrides...] [-m]``: the sweep runner (:mod:`lorabench.sweep`) under the CLI.

Everything after ``run`` goes to Hydra untouched, so these are the same::

    lorabench run -m sweep=cpu-smoke
    python -m lorabench.sweep -m sweep=cpu-smoke

Importing this module imports neither torch nor Hydra (both load inside :func:`run_hydra`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

HELP_EPILOG = """examples:
  lorabench run model=tiny-llama method=lora device=cpu train.seq_len=64
  lorabench run -m method=lora,qlora train.seq_len=128,256
  lorabench run -m sweep=cpu-smoke                      # preset grid (conf/sweep/cpu-smoke.yaml)
  lorabench run -m sweep=gpu-validate gpu=h200-141gb    # on an H200
  lorabench run -m sweep=cpu-smoke hydra/launcher=local_parallel num_threads=1
  lorabench run --cfg job                               # print the composed config (Hydra flag)

Records are appended to results/<sweep_name>/records.jsonl; a re-run skips the runs already recorded ok.
Hydra's own files go to results/_scratch/hydra/ (git-ignored)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run`` subcommand (its arguments are Hydra overrides, parsed by Hydra)."""
    parser = subparsers.add_parser(
        "run", help="run and record real training runs (Hydra sweep; see `lorabench run --help`)",
        description="Run real training steps for each config of a Hydra (multi)run and append one record per "
                    "run. Arguments are Hydra overrides: group=option, key=value, a,b,c lists with -m.",
        epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--multirun", action="store_true", help="sweep over comma-separated values")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides (key=value, group=option)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """argparse entry (used when the CLI parsed the arguments itself)."""
    return run_hydra((["--multirun"] if args.multirun else []) + list(args.overrides))


def run_hydra(argv: Sequence[str]) -> int:
    """Run the Hydra app with ``argv`` as its command line (exactly what ``python -m lorabench.sweep`` gets).

    Returns:
        0, or Hydra's exit status when it exits (bad override, unknown group option).
    """
    from lorabench import sweep
    from lorabench.runconfig import compose_problem

    problem = compose_problem(list(argv))
    if problem:
        sys.stderr.write(f"lorabench run: error: {problem}; see `lorabench run --help`\n")
        return 2
    saved = sys.argv
    sys.argv = ["lorabench run", *argv]
    try:
        sweep.main()
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0
