"""What measuring costs: tokens/s with and without the instrument the sweep runner uses.

- GPU with NVML: the :class:`~lorabench.runtime.probe.NvmlSampler` thread (default 200 Hz) that runs beside
  every GPU job.
- CPU, or no NVML: prints ``no NVML`` and measures the :class:`~lorabench.runtime.tracker.MemoryTracker`
  dispatch mode instead (it sees every op of every CPU job, so it costs far more than a sampler).

Runs alternate A/B blocks (without, with, without, ...) on the same model, optimizer and batch, so drift
(thermal, other tenants) hits both arms alike; the overhead is 1 - median(with) / median(without) of the
per-block tokens/s.

    python scripts/bench_sampler_overhead.py                                   # tiny-llama on this machine
    python scripts/bench_sampler_overhead.py --model llama-3.2-1b --method lora --seq-len 2048 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _environment(device: str) -> dict[str, Any]:
    from lorabench.records import environment

    return environment(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps-per-block", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=4, help="blocks per arm (A/B alternating)")
    parser.add_argument("--hz", type=float, default=200.0, help="NVML sampling rate")
    parser.add_argument("--out", default=str(ROOT / "results" / "_scratch" / "sampler_overhead.json"))
    return parser.parse_args(argv)


def nvml_available() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def block_tokens_per_s(run_steps: Callable[[], None], n_steps: int, tokens_per_step: int, sync: Callable[[], None],
                       instrument: contextlib.AbstractContextManager[Any]) -> float:
    """tokens/s of ``n_steps`` steps run inside ``instrument``."""
    with instrument:
        sync()
        t0 = time.perf_counter()
        for _ in range(n_steps):
            run_steps()
        sync()
        return n_steps * tokens_per_step / (time.perf_counter() - t0)


@contextlib.contextmanager
def nvml_sampling(hz: float) -> Any:
    from lorabench.runtime.probe import NvmlSampler

    sampler = NvmlSampler(hz).start()
    try:
        yield sampler
    finally:
        nvml_sampling.last = sampler.stop()  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from lorabench.catalog import load_model
    from lorabench.methods import make_config
    from lorabench.runtime.build import prepare_model
    from lorabench.runtime.step import autocast_dtype_for, make_optimizer, synthetic_batch, train_steps
    from lorabench.runtime.tracker import MemoryTracker
    from lorabench.specs import TrainSpec

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    use_nvml = device == "cuda" and nvml_available()
    if not use_nvml:
        print("no NVML: measuring the MemoryTracker's overhead instead of the NVML sampler's")
    precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    spec, method = load_model(args.model), make_config(args.method)
    train = TrainSpec(micro_batch_size=args.micro_batch, seq_len=args.seq_len, precision=precision)
    model = prepare_model(spec, method, train, device=device)
    batch = synthetic_batch(spec.vocab_size, train.micro_batch_size, train.seq_len, device)
    optimizer = make_optimizer(model.parameters(), train.optimizer, 1e-5, foreach=True)
    autocast = autocast_dtype_for(precision)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tracker_holder: dict[str, Any] = {"tracker": None}

    def step_plain() -> None:
        train_steps(model, batch, optimizer, 1, autocast_dtype=autocast)

    def step_tracked() -> None:
        train_steps(model, batch, optimizer, 1, tracker=tracker_holder["tracker"], autocast_dtype=autocast)

    step_plain()  # warmup: optimizer states, kernels, allocator
    step_plain()
    without, with_ = [], []
    for _ in range(args.blocks):
        without.append(block_tokens_per_s(step_plain, args.steps_per_block, train.tokens_per_step, sync,
                                          contextlib.nullcontext()))
        if use_nvml:
            with_.append(block_tokens_per_s(step_plain, args.steps_per_block, train.tokens_per_step, sync,
                                            nvml_sampling(args.hz)))
        else:
            tracker_holder["tracker"] = MemoryTracker()
            with_.append(block_tokens_per_s(step_tracked, args.steps_per_block, train.tokens_per_step, sync,
                                            contextlib.nullcontext()))
            tracker_holder["tracker"].close()
    base, instrumented = statistics.median(without), statistics.median(with_)
    result = {
        "instrument": "nvml_sampler" if use_nvml else "memory_tracker",
        "nvml": use_nvml,
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "config": {"model": args.model, "method": args.method, "precision": precision,
                   "micro_batch_size": args.micro_batch, "seq_len": args.seq_len,
                   "steps_per_block": args.steps_per_block, "blocks": args.blocks,
                   "sampler_hz": args.hz if use_nvml else None},
        "tokens_per_s_without": base,
        "tokens_per_s_with": instrumented,
        "overhead_fraction": 1 - instrumented / base,
        "blocks_without": without,
        "blocks_with": with_,
        "sampler": nvml_sampling.last.to_dict() if use_nvml else None,  # type: ignore[attr-defined]
        "torch": torch.__version__,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "env": _environment(device),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['instrument']} on {device}: {base:.0f} tok/s without, {instrumented:.0f} with "
          f"-> overhead {100 * result['overhead_fraction']:.1f}%  ({out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
