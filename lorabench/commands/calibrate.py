"""``lorabench calibrate``: fit the planner's device overheads on half of the GPU runs, score the other half.

Writes conf/calibration/<gpu>.yaml (:mod:`lorabench.calibrate`). Refuses in one line (exit 2) without GPU
records. Torch-free (the planner and the record files only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from lorabench.calibrate.fit import DEFAULT_RECORDS

    p = sub.add_parser(
        "calibrate", help="fit the planner's CUDA context and allocator slack on GPU records (half), score the rest",
        description="Fit cuda_context_bytes, allocator_slack_fraction and allocator_slack_min_bytes on the GPU runs "
                    "whose sha1(salt + run_id) is even, score the planner on the others and on every OOM probe, "
                    "and write conf/calibration/<gpu>.yaml.")
    p.add_argument("--records", nargs="+", default=None, help=f"records files (default: {', '.join(DEFAULT_RECORDS)})")
    p.add_argument("--gpu", default=None, help="catalog GPU to fit (default: the records' only GPU)")
    p.add_argument("--out", type=Path, default=None, help="calibration YAML (default conf/calibration/<gpu>.yaml)")
    p.add_argument("--no-write", action="store_true", help="report only")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorabench.calibrate import DEFAULT_RECORDS, Refusal, calibrate
    from lorabench.calibrate.fit import ROOT

    paths = args.records or [p for p in DEFAULT_RECORDS if (ROOT / p).is_file()] or list(DEFAULT_RECORDS)
    paths = [p if Path(p).is_absolute() or Path(p).exists() else str(ROOT / p) for p in paths]
    try:
        result = calibrate(paths, args.gpu, args.out, args.no_write)
    except Refusal as err:
        print(f"lorabench calibrate: {err}", file=sys.stderr)
        return 2
    cal = result["calibration"]
    print(f"fitted: cuda_context_bytes={cal['cuda_context_bytes']:,} allocator_slack_fraction="
          f"{cal['allocator_slack_fraction']} allocator_slack_min_bytes={cal['allocator_slack_min_bytes']:,}")
    print("allocated residual (measured - predicted) on the fit half, quartiles in MiB: "
          + ", ".join(f"{k} {v / 2**20:+.1f}" for k, v in cal["fit"]["allocated_residual_bytes"].items()))
    print("\n".join(result["report"]))
    print(f"wrote {result['written']}" if result["written"] else "not written (--no-write)")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if args.strict and result["failures"] else 0
