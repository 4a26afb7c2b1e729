"""Time the fake-tensor tracer on full-size models: 7B LoRA, 7B full fine-tuning, 70B QLoRA.

    python scripts/bench_trace.py                       # the three default cases, b=1 s=512
    python scripts/bench_trace.py --seq-len 2048 --out /tmp/bench_trace.json
    python scripts/bench_trace.py --case 7b:lora:bf16 --case 70b:qlora:bf16:ckpt

Each case prints its peak, phase and wall time. A tiny-llama trace runs first so that import and
first-dispatch costs (reported as ``warmup_s``) do not land on the first case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from lorabench.catalog import load_model
from lorabench.methods import make_config
from lorabench.specs import TrainSpec

DEFAULT_CASES = ("7b:lora:bf16", "7b:full:bf16-mixed", "70b:qlora:bf16")
GiB = 1024**3


def parse_case(text: str) -> tuple[str, str, str, bool]:
    """``model:method:precision[:ckpt]`` -> (model, method, precision, checkpointing)."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "ckpt"):
        raise SystemExit(f"bad --case {text!r}: use model:method:precision[:ckpt], e.g. 7b:lora:bf16")
    return parts[0], parts[1], parts[2], len(parts) == 4


def run_case(case: str, micro_batch_size: int, seq_len: int) -> dict:
    from lorabench.runtime.trace import trace

    model, method, precision, ckpt = parse_case(case)
    train = TrainSpec(micro_batch_size=micro_batch_size, seq_len=seq_len, precision=precision,
                      gradient_checkpointing=ckpt)
    result = trace(load_model(model), make_config(method), train)
    return {"case": case, "micro_batch_size": micro_batch_size, "seq_len": seq_len, "seconds": round(result.seconds, 2),
            "peak_bytes": result.peak_bytes, "phase": result.phase, "components": result.components,
            "phase_peak_bytes": result.phase_peak_bytes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", action="append", help="model:method:precision[:ckpt] (repeatable)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    start = time.perf_counter()
    run_case("tiny-llama:lora:bf16", 1, 16)
    warmup_s = time.perf_counter() - start
    print(f"warmup (imports + first trace): {warmup_s:.1f} s", flush=True)
    rows = []
    for case in args.case or DEFAULT_CASES:
        row = run_case(case, args.batch, args.seq_len)
        rows.append(row)
        print(f"{case:24s} b={args.batch} s={args.seq_len}: peak {row['peak_bytes'] / GiB:8.3f} GiB in "
              f"{row['phase']:9s} traced in {row['seconds']:6.1f} s", flush=True)

    import torch
    import transformers

    doc = {"warmup_s": round(warmup_s, 2), "rows": rows,
           "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                   "python": sys.version.split()[0], "platform": platform.platform(),
                   "cpu_count": os.cpu_count()}}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
