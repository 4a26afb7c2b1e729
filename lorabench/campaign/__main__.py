"""``python -m lorabench.campaign``: the prioritized, resumable GPU campaign (or its CPU dry run) in one call.

    python -m lorabench.campaign --out $OUT                               # on the GPU (scripts/gpu_campaign.sh)
    python -m lorabench.campaign --preset gpu-campaign-dry --results /tmp/r --out /tmp/o --budget-s 150
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lorabench.campaign.run import Settings, run_campaign
from lorabench.errors import UserError


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m lorabench.campaign", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpu-campaign", help="conf/sweep preset with a campaign node")
    p.add_argument("--results", type=Path, default=Path("results"), help="records dir (resume reads it)")
    p.add_argument("--out", type=Path, required=True, help="where every finished record is copied at once")
    p.add_argument("--budget-s", type=float, default=540.0, help="seconds from --started-at to the end")
    p.add_argument("--started-at", type=float, default=None, help="epoch seconds the command started (default now)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra Hydra override")
    args = p.parse_args(argv)
    return Settings(preset=args.preset, results_dir=args.results.resolve(), out_dir=args.out.resolve(),
                    budget_s=args.budget_s, started_at=args.started_at or time.time(), extra=tuple(args.set))


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        tally = run_campaign(settings)
    except UserError as err:
        print(f"campaign: error: {err}", file=sys.stderr)
        return 2
    print(tally.summary(time.time() - settings.started_at), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
