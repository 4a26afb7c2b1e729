"""Cold-start time of `lorabench plan` (target < 0.3 s wall): median of N fresh interpreter runs.

    python scripts/bench_plan_startup.py [--runs 15] [--out startup.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "lorabench.cli", "plan", "--model", "70b", "--method", "qlora"]
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    result = {"command": "lorabench plan --model 70b --method qlora", "runs": args.runs,
              "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
              "max_s": round(max(times), 4)}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
