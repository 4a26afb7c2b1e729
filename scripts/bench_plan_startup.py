"""Cold-start time of `lorabench plan` (target < 0.3 s wall): median of N fresh interpreter runs.

    python scripts/bench_plan_startup.py [--runs 15] [--out results/bench/plan-startup.json]

Also records the CPU time of each run (user + sys; a loaded machine stretches wall time, not CPU time),
the machine's load average and the record environment (versions, git commit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    from lorabench.records import environment

    times, cpu_times = [], []
    load_before = os.getloadavg()[0]
    for _ in range(args.runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_times.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    result = {"command": "lorabench plan --model 70b --method qlora", "runs": args.runs,
              "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
              "max_s": round(max(times), 4), "cpu_median_s": round(statistics.median(cpu_times), 4),
              "cpu_count": os.cpu_count(), "load_avg_1min": round(max(load_before, os.getloadavg()[0]), 2),
              "env": environment("cpu")}
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
