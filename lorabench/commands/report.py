"""``lorabench report RESULTS_DIR``: reconcile predicted, traced and measured memory of a sweep.

Writes ``reports/<sweep>/README.md`` (tables, decisions) and its PNG figures, then prints the README's
path. pandas and matplotlib are imported inside :func:`run` only.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="tables and figures reconciling predicted vs measured memory of a sweep",
        description="Read RESULTS_DIR/records.jsonl (written by the sweep runner) and write a markdown report "
                    "with PNG figures: predicted vs measured at the allocated, reserved and device levels, "
                    "per-component errors, fit/OOM verdicts, throughput vs memory and decision tables.")
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="a sweep's results folder, e.g. results/cpu-smoke")
    p.add_argument("--out", default=None, help="output folder (default: reports/ + RESULTS_DIR below results/, e.g. results/X/s -> reports/X/s); "
                        "a README generated from other records is never overwritten")
    p.add_argument("--gpu", default=None,
                   help="catalog GPU for the decision tables (default: the records' GPU, else h100-80gb)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorabench.errors import UserError

    try:
        from lorabench.report.build import build_report
    except ImportError as err:  # pandas/matplotlib come with the runtime extra, not the torch-free core
        raise UserError(f"`lorabench report` needs {err.name or 'pandas and matplotlib'}",
                        "pip install 'lorabench[runtime]' (or pandas matplotlib tabulate)") from None

    readme, warnings = build_report(args.results_dir, out=args.out, gpu=args.gpu)
    for warning in warnings:
        sys.stderr.write(f"lorabench report: warning: {warning}\n")
    print(readme)
    return 0
