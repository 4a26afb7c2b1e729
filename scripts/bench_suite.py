"""How long `make test` takes: wall and CPU seconds of building .venv and of the suite, from a fresh clone.

    python scripts/bench_suite.py --out results/bench/test-suite.json           # clone HEAD, make env, make test
    python scripts/bench_suite.py --in-place --out /tmp/suite.json              # the suite in this checkout

The fresh clone is `git clone` of the committed HEAD into a temporary folder (uncommitted changes are not
in it); pip's cache makes `make env` the time a returning user sees. The record keeps the test counts
pytest printed, the machine's CPU count and load average (a loaded machine stretches wall time, not CPU
time), the date and the commit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> tuple[float, float, str, int]:
    """(wall s, CPU s of the command and its children, its output, exit code)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout, proc.returncode


def counts(summary: str) -> dict[str, int]:
    """pytest's final line, e.g. '723 passed, 4 skipped in 118.2s' -> {'passed': 723, 'skipped': 4}."""
    last = [ln for ln in summary.splitlines() if re.search(r"\d+ (passed|failed)", ln)][-1:]
    found = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?)",
                                              last[0] if last else "")}
    return {"passed": 0, "failed": 0, "skipped": 0, **found}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--in-place", action="store_true", help="run the suite here instead of in a fresh clone")
    args = ap.parse_args()
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    load_before = os.getloadavg()[0]
    doc: dict = {"date": dt.date.today().isoformat(), "commit": sha[:12], "cpu_count": os.cpu_count(),
                 "fresh_clone": not args.in_place}
    with tempfile.TemporaryDirectory(prefix="lorabench-suite-") as tmp:
        where = ROOT
        if not args.in_place:
            where = Path(tmp) / "lorabench"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(where)], check=True)
            doc["venv_wall_s"], doc["venv_cpu_s"], out, rc = timed(["make", "env"], where)
            if rc:
                print(out[-3000:], file=sys.stderr)
                return 1
        python = where / ".venv" / "bin" / "python" if not args.in_place else Path(sys.executable)
        wall, cpu, out, rc = timed([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], where)
    failed = sorted({ln.split()[1] for ln in out.splitlines() if ln.startswith(("FAILED ", "ERROR "))})
    doc.update({"suite_wall_s": wall, "suite_cpu_s": cpu, "exit_code": rc, "tests": counts(out), "failed": failed,
                "load_avg_1min": round(max(load_before, os.getloadavg()[0]), 2)})
    doc = {k: round(v, 1) if isinstance(v, float) else v for k, v in doc.items()}
    doc["suite_wall_min"] = round(doc["suite_wall_s"] / 60, 1)
    print(json.dumps(doc, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
