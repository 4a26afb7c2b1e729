"""Per-job overhead of the two job launchers, side by side in one run: fresh subprocess vs fork from the job server.

Overhead = job wall time (launch to exit, measured by the parent) - model build - steps - trace, i.e. what
process start, imports, the environment and writing the result cost on top of the measurement. The same tiny
jobs (tiny-llama on the CPU, 2 warmup + 5 timed steps, one thread) alternate between the launchers, so machine
load affects both alike.

    python scripts/bench_job_overhead.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("lora", "qlora", "ia3", "full")


def payloads() -> list[dict]:
    from hydra import compose, initialize_config_dir

    from lorabench.jobs import build_specs, job_payload, record_config
    from lorabench.sweep import CONF_DIR

    out = []
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        for method in METHODS:
            cfg = compose("config", overrides=["device=cpu", "num_threads=1", f"method={method}", "train.seq_len=32",
                                               "train.warmup_steps=2", "train.timed_steps=5"])
            specs = build_specs(cfg)
            out.append(job_payload(cfg, specs, record_config(cfg, specs, "cpu")))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds of the four jobs per launcher")
    args = p.parse_args(argv)
    from lorabench.jobs import JobSpecs  # noqa: F401  (import cost outside the timing)
    from lorabench.runtime.jobserver import JobServer
    from lorabench.runtime.launch import run_job_subprocess
    from lorabench.sweep import job_timing

    jobs = payloads()
    server = JobServer()
    print(f"job server start (imports, once): {server.start():.2f} s")
    overheads: dict[str, list[float]] = {"subprocess": [], "fork": []}
    for _ in range(args.rounds):
        for launcher in overheads:
            for payload in jobs:
                t0 = time.perf_counter()
                out = run_job_subprocess(payload, 300) if launcher == "subprocess" else server.run(payload, 300)
                assert out.status == "ok", out.error
                timing = job_timing(out.measured, out.wall_s)
                overheads[launcher].append(timing["job_overhead_s"])
                print(f"{launcher:<10} {payload['config']['method']['method']:<6} wall {timing['job_wall_s']:.2f} s "
                      f"build {out.measured['build_s']:.2f} s steps {out.measured['steps_s']:.2f} s "
                      f"overhead {timing['job_overhead_s']:.2f} s ({time.perf_counter() - t0:.2f} s)")
    sub, fork = (statistics.median(overheads[k]) for k in ("subprocess", "fork"))
    print(f"per-job overhead, CPU ({len(overheads['fork'])} jobs each): subprocess median {sub:.2f} s, "
          f"fork median {fork:.2f} s, ratio {sub / fork:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
