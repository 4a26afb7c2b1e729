"""Step-time ratios measured side by side in ONE process on the CPU: QLoRA/LoRA (same targets),
checkpointing on/off (LoRA), full/LoRA; predicted by lorabench's step-time model for the same configs.

The machine is shared, so absolute CPU times drift with the load; ratios are measured by alternating the two
configurations step by step (A B A B ...) after warmup and taking the ratio of the medians, repeated
``--rounds`` times (median of rounds reported, all rounds kept). Single-threaded, bf16, synthetic tokens,
random init, the runner's own training step (:func:`lorabench.runtime.step.train_steps`).

    python scripts/bench_cpu_ratios.py --out results/cpu-time/ratios.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from lorabench.architectures import spec_from_hf_config
from lorabench.catalog import load_gpu, load_model
from lorabench.methods import make_config
from lorabench.records import environment
from lorabench.runtime.build import prepare_model
from lorabench.runtime.step import make_optimizer, synthetic_batch, train_steps
from lorabench.specs import TrainSpec
from lorabench.steptime.model import predict_time

#: The three model sizes of the cpu-time sweep (scripts/cpu_time_sweep.sh).
SIZES = {
    "small": {},
    "medium": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
               "num_key_value_heads": 4, "vocab_size": 2048},
    "large": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 12,
              "num_key_value_heads": 4, "vocab_size": 8192},
}
#: (name, (method A, knobs A, checkpointing A), (method B, knobs B, checkpointing B)): ratio = B / A.
PAIRS = (
    ("qlora/lora", ("lora", {"target_modules": "all-linear"}, False), ("qlora", {}, False)),
    ("ckpt on/off", ("lora", {}, False), ("lora", {}, True)),
    ("full/lora", ("lora", {}, False), ("full", {}, False)),
)


def _setup(spec, method, knobs, ckpt, batch, seq):  # type: ignore[no-untyped-def]
    train = TrainSpec(micro_batch_size=batch, seq_len=seq, precision="bf16", gradient_checkpointing=ckpt)
    cfg = make_config(method, knobs)
    model = prepare_model(spec, cfg, train, device="cpu", seed=0)
    opt = make_optimizer(model.parameters(), train.optimizer, 1e-4, foreach=True)
    return cfg, train, model, opt, synthetic_batch(spec.vocab_size, batch, seq, "cpu", 0)


def _step_s(setup) -> float:  # type: ignore[no-untyped-def]
    _, _, model, opt, batch = setup
    t0 = time.perf_counter()
    train_steps(model, batch, opt, 1)
    return time.perf_counter() - t0


def measure_pair(spec, a, b, batch: int, seq: int, steps: int, rounds: int, cpu) -> dict:  # type: ignore[no-untyped-def]
    sa, sb = _setup(spec, *a, batch, seq), _setup(spec, *b, batch, seq)
    for _ in range(2):
        _step_s(sa), _step_s(sb)
    ratios, times_a, times_b = [], [], []
    for _ in range(rounds):
        ta, tb = [], []
        for _ in range(steps):
            ta.append(_step_s(sa))
            tb.append(_step_s(sb))
        ratios.append(statistics.median(tb) / statistics.median(ta))
        times_a += ta
        times_b += tb
    pa = predict_time(spec, sa[0], sa[1], cpu).step_time_s
    pb = predict_time(spec, sb[0], sb[1], cpu).step_time_s
    return {"measured_ratio": statistics.median(ratios), "round_ratios": ratios, "predicted_ratio": pb / pa,
            "a_step_s_median": statistics.median(times_a), "b_step_s_median": statistics.median(times_b),
            "a_predicted_s": pa, "b_predicted_s": pb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/cpu-time/ratios.json"))
    ap.add_argument("--device", default="cpu-epyc-1t", help="CPU catalog entry the predictions use")
    ap.add_argument("--sizes", default="small,medium,large")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cpu = load_gpu(args.device)
    base = load_model("tiny-llama")
    load_before = os.getloadavg()
    rows = []
    for size in args.sizes.split(","):
        spec = spec_from_hf_config({**base.hf_config, **SIZES[size]}, name=f"tiny-llama-{size}") if SIZES[size] else base
        for name, a, b in PAIRS:
            row = {"size": size, "hf_config_overrides": SIZES[size], "ratio": name, "a": list(a), "b": list(b),
                   **measure_pair(spec, a, b, args.batch, args.seq_len, args.steps, args.rounds, cpu)}
            rows.append(row)
            print(f"{size:7s} {name:12s} measured {row['measured_ratio']:.2f} predicted {row['predicted_ratio']:.2f}",
                  flush=True)
    env = environment("cpu")
    env["load_average_before"] = [round(x, 2) for x in load_before]
    doc = {"settings": {"batch": args.batch, "seq_len": args.seq_len, "precision": "bf16", "threads": 1,
                        "steps_per_round": args.steps, "rounds": args.rounds, "device_entry": args.device},
           "env": env, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
