"""QLoRA side by side in one run: lorabench NF4 vs bitsandbytes Linear4bit vs bf16 LoRA, plus NF4 dequantize GB/s.

Three variants of the SAME model, LoRA (r, alpha, ``all-linear`` targets, fp32 adapters), batch and optimizer
(torch AdamW, foreach), trained with the runner's own step (:func:`lorabench.runtime.step.train_steps`) in one
process, one after the other:

- ``qlora-lorabench``: ``QLoraConfig(backend="lorabench")``, lorabench's NF4 ``Linear4bit``;
- ``qlora-bitsandbytes``: ``QLoraConfig(backend="bitsandbytes")``, ``bitsandbytes.nn.Linear4bit`` (nf4, double quant);
- ``lora-bf16``: ``LoraConfig`` on the bf16 base (what QLoRA saves memory against).

Per variant: tokens/s = tokens per step / median step time of ``--steps`` timed steps after ``--warmup`` untimed
ones (CUDA synchronized around each step); peak memory = ``torch.cuda.max_memory_allocated`` over the steps
(peaks reset after the build, so resident weights count, the build's transient does not; the build's own peak is
reported apart) on CUDA, the :class:`~lorabench.runtime.tracker.MemoryTracker`'s tensor peak over the untimed
steps on the CPU (at least two: step 2 is the first with optimizer state), as in :mod:`lorabench.runtime.job`.
Ratios: lorabench / bitsandbytes (tokens/s and peak) and each QLoRA / bf16 LoRA.

NF4 dequantize micro-benchmark: :func:`scripts.bench_nf4.run` (same timing and byte accounting) on a
``--nf4-rows x --nf4-cols`` bf16 weight; GB/s = (NF4 bytes read + bf16 bytes written) / median time, and on CUDA
its fraction of the catalog GPU's memory bandwidth (``memory_bandwidth_bytes_per_s``).

    python scripts/bench_qlora.py --out results/_scratch/bench_qlora.json                     # GPU, llama-3.2-1b
    python scripts/bench_qlora.py --device cpu --model tiny-llama --batch 2 --seq-len 64      # CPU dry run

On the CPU the absolute numbers are CPU numbers (and the ratios reflect CPU kernels): never GPU figures.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "qlora-lorabench": ("qlora", {"backend": "lorabench", "dequant": "triton"}),
    "qlora-lorabench-torch": ("qlora", {"backend": "lorabench", "dequant": "torch"}),
    "qlora-bitsandbytes": ("qlora", {"backend": "bitsandbytes"}),
    "qlora-peft-bitsandbytes": ("qlora", {"backend": "bitsandbytes"}),
    "lora-bf16": ("lora", {}),
}
"""``qlora-lorabench`` is the Triton path (CUDA only: skipped on the CPU, where the op computes with torch);
``qlora-peft-bitsandbytes`` is the stack people run: bitsandbytes ``Linear4bit`` layers with ``peft.get_peft_model``
(PEFT's bnb LoRA layer, fp32 adapters); ``qlora-bitsandbytes`` is the same bitsandbytes layers under lorabench's
LoRA layer."""
CUDA_ONLY = {"qlora-lorabench"}
PEFT_VARIANTS = {"qlora-peft-bitsandbytes"}
CPU_NOTE = ("device cpu: a dry run of the benchmark's code path. Absolute times, tokens/s and GB/s are CPU "
            "figures, NOT GPU figures, and the ratios reflect CPU kernels; never quote them as GPU results.")


def load_bench_nf4() -> Any:
    """scripts/bench_nf4.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_nf4", ROOT / "scripts" / "bench_nf4.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def bnb_available() -> bool:
    """Whether bitsandbytes imports (its CPU backend's ``kernels`` warning silenced)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    """Free what the previous variant left (Python garbage, then the CUDA cache) and reset the peak."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure_variant(name: str, spec: Any, method: Any, train: Any, device: str, warmup: int, steps: int,
                    seed: int, lr: float, gpu: Any) -> dict[str, Any]:
    """Build one variant, run warmup + timed steps, and return its figures (see the module docstring)."""
    import torch

    from lorabench.memory.planner import predict
    from lorabench.runtime.build import count_trainable, prepare_model
    from lorabench.runtime.job import capped_tracker, untimed_steps
    from lorabench.runtime.step import make_optimizer, synthetic_batch, train_steps

    release(device)
    t0 = time.perf_counter()
    model = (peft_qlora_model(spec, method, train, device, seed) if name in PEFT_VARIANTS
             else prepare_model(spec, method, train, device=device, seed=seed))
    sync(device)
    build_s = time.perf_counter() - t0
    build_peak = int(torch.cuda.max_memory_allocated()) if device == "cuda" else None
    optimizer = make_optimizer(model.parameters(), train.optimizer, lr, foreach=True)
    batch = synthetic_batch(spec.vocab_size, train.micro_batch_size, train.seq_len, device, seed)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tracker = capped_tracker(None) if device == "cpu" else None
    untimed = untimed_steps(warmup, tracked=tracker is not None)
    losses: list[float] = []
    times_s: list[float] = []
    for i in range(untimed + steps):
        step_tracker = tracker if i < untimed else None
        sync(device)
        start = time.perf_counter()
        losses += train_steps(model, batch, optimizer, 1, tracker=step_tracker, loss=train.loss)
        sync(device)
        if i >= untimed:
            times_s.append(time.perf_counter() - start)
        elif i == untimed - 1 and tracker is not None:
            tracker.close()
    tokens = train.micro_batch_size * train.seq_len
    median_s = statistics.median(times_s)
    if device == "cuda":
        peak, reserved = int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())
    else:
        peak, reserved = int(tracker.peak_bytes), None
    predicted = predict(spec, method, train, gpu)
    out = {"variant": name, "method": method.to_dict(), "trainable_params": count_trainable(model),
           "tokens_per_step": tokens, "step_time_s_median": median_s, "step_times_s": times_s,
           "tokens_per_s": tokens / median_s, "peak_allocated_bytes": peak, "peak_reserved_bytes": reserved,
           "peak_source": "torch.cuda.max_memory_allocated" if device == "cuda" else "MemoryTracker (CPU tensors)",
           "build_s": build_s, "build_peak_allocated_bytes": build_peak,
           "predicted_peak_allocated_bytes": predicted.peak_allocated_bytes,
           "loss_first": losses[0], "loss_last": losses[-1]}
    del model, optimizer, batch
    release(device)
    return out


def peft_qlora_model(spec: Any, method: Any, train: Any, device: str, seed: int) -> Any:
    """The bitsandbytes + PEFT stack: the 16-bit model, its quantizable linears replaced by bitsandbytes
    ``Linear4bit``, then ``peft.get_peft_model`` with the same LoRA (targets, r, alpha, no dropout)."""
    import peft

    from lorabench.methods.common import freeze, replace_module
    from lorabench.methods.qlora.layer import quantize_linear, quantized_paths
    from lorabench.methods.targets import select
    from lorabench.runtime.build import build_model

    model = build_model(spec, train, device=device, seed=seed)
    for path in quantized_paths(model, spec):
        replace_module(model, path, quantize_linear(model.get_submodule(path), method))
    freeze(model)
    targets = sorted({m.leaf for m in select(spec, method.target_modules, (), method.name)})
    config = peft.LoraConfig(r=method.r, lora_alpha=method.lora_alpha, lora_dropout=method.lora_dropout,
                             target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """tokens/s and peak ratios: lorabench (Triton and torch paths) / bitsandbytes (+ PEFT), each QLoRA / bf16 LoRA."""
    pairs = {"lorabench_over_bitsandbytes": ("qlora-lorabench", "qlora-bitsandbytes"),
             "lorabench_over_peft_bitsandbytes": ("qlora-lorabench", "qlora-peft-bitsandbytes"),
             "lorabench_torch_over_peft_bitsandbytes": ("qlora-lorabench-torch", "qlora-peft-bitsandbytes"),
             "lorabench_triton_over_torch": ("qlora-lorabench", "qlora-lorabench-torch"),
             "qlora_lorabench_over_lora_bf16": ("qlora-lorabench", "lora-bf16"),
             "qlora_lorabench_torch_over_lora_bf16": ("qlora-lorabench-torch", "lora-bf16"),
             "qlora_bitsandbytes_over_lora_bf16": ("qlora-bitsandbytes", "lora-bf16"),
             "qlora_peft_bitsandbytes_over_lora_bf16": ("qlora-peft-bitsandbytes", "lora-bf16")}
    out: dict[str, float] = {}
    for key, (a, b) in pairs.items():
        if a in results and b in results:
            out[f"{key}.tokens_per_s"] = results[a]["tokens_per_s"] / results[b]["tokens_per_s"]
            out[f"{key}.peak_allocated"] = results[a]["peak_allocated_bytes"] / results[b]["peak_allocated_bytes"]
    return out


def nested(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{"a.tokens_per_s": x}`` as ``{"a": {"tokens_per_s": x}}`` (addressable by dotted keys)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        pair, metric = key.rsplit(".", 1)
        out.setdefault(pair, {})[metric] = value
    return out


def nf4_dequantize(device: str, rows: int, cols: int, repeats: int, with_bnb: bool, gpu: Any) -> list[dict[str, Any]]:
    """Dequantize rows of scripts/bench_nf4.py's run(), with the fraction of the GPU's catalog bandwidth."""
    import torch

    bench = load_bench_nf4()
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    rows_out = [r for r in bench.run(rows, cols, torch.bfloat16, [dev], 2, repeats, not with_bnb)
                if r["op"] == "dequantize"]
    for r in rows_out:
        r["shape"] = [rows, cols]
        bandwidth = gpu.memory_bandwidth_bytes_per_s if (device == "cuda" and gpu) else None
        r["reference_bandwidth_bytes_per_s"] = bandwidth
        r["fraction_of_bandwidth"] = r["gb_per_s"] * 1e9 / bandwidth if bandwidth else None
    return rows_out


def resolve_gpu(device: str, name: str | None) -> Any:
    """The catalog GpuSpec: ``--gpu`` if given, else NVML's device 0 on CUDA, else None."""
    from lorabench.catalog import load_gpu
    from lorabench.runtime.probe import detect_gpu

    if name:
        return load_gpu(name)
    return detect_gpu() if device == "cuda" else None


def table(result: dict[str, Any]) -> str:
    lines = [f"{'variant':<20} {'tokens/s':>12} {'step ms':>10} {'peak MiB':>10} {'pred MiB':>10} {'build s':>8}"]
    for r in result["variants"]:
        lines.append(f"{r['variant']:<20} {r['tokens_per_s']:>12.1f} {1e3 * r['step_time_s_median']:>10.2f} "
                     f"{r['peak_allocated_bytes'] / 2**20:>10.2f} {r['predicted_peak_allocated_bytes'] / 2**20:>10.2f} "
                     f"{r['build_s']:>8.2f}")
    lines += [f"{k:<50} {v:.3f}" for k, v in result["ratios"].items()]
    for r in result["nf4_dequantize"]:
        frac = f" = {100 * r['fraction_of_bandwidth']:.1f}% of {r['reference_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s" \
            if r["fraction_of_bandwidth"] else " (no GPU bandwidth reference on the CPU)"
        lines.append(f"NF4 dequantize {r['backend']:<13} {r['shape'][0]}x{r['shape'][1]} bf16: "
                     f"{r['time_ms']:.3f} ms, {r['gb_per_s']:.2f} GB/s{frac}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--model", default="llama-3.2-1b", help="catalog model (tiny-llama for the CPU dry run)")
    p.add_argument("--hf", action="append", default=[], metavar="KEY=INT",
                   help="override an integer field of the model's HF config (e.g. intermediate_size=192, a shape "
                        "bitsandbytes' CPU kernels accept for the dry run)")
    p.add_argument("--gpu", default=None, help="catalog GPU for the bandwidth reference (default: detected)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every variant")
    p.add_argument("--loss", choices=("hf", "chunked"), default="hf", help="the loss of every variant")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--nf4-rows", type=int, default=8192)
    p.add_argument("--nf4-cols", type=int, default=8192)
    p.add_argument("--nf4-repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default torch's)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from lorabench import records
    from lorabench.catalog import load_model
    from lorabench.methods import make_config
    from lorabench.specs import OptimizerSpec, TrainSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_qlora: no CUDA device here; pass --device cpu --model tiny-llama for the dry run", file=sys.stderr)
        return 2
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"bench_qlora: unknown variant(s) {unknown}; use {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    with_bnb = bnb_available()
    skipped: dict[str, str] = {}
    for name in list(names):
        if not with_bnb and "bitsandbytes" in name:
            skipped[name] = "bitsandbytes does not import"
        elif name in CUDA_ONLY and args.device != "cuda":
            skipped[name] = "the Triton kernel runs on CUDA (on the CPU its op computes with torch: no Triton figure)"
        elif name in PEFT_VARIANTS and importlib.util.find_spec("peft") is None:
            skipped[name] = "peft is not installed"
    for name, why in skipped.items():
        print(f"bench_qlora: {name} skipped: {why}", file=sys.stderr)
        names.remove(name)
    if args.device == "cpu":
        print(f"NOTE: {CPU_NOTE}")
    spec = load_model(args.model)
    if args.hf:
        from lorabench.architectures import spec_from_hf_config

        overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.hf)}
        spec = spec_from_hf_config({**spec.hf_config, **overrides}, name=spec.name, display=spec.display)
    gpu = resolve_gpu(args.device, args.gpu)
    train = TrainSpec(micro_batch_size=args.batch, seq_len=args.seq_len, precision="bf16",
                      gradient_checkpointing=args.checkpointing, optimizer=OptimizerSpec("adamw"), loss=args.loss)
    lora_knobs = {"r": args.r, "lora_alpha": args.lora_alpha, "target_modules": "all-linear"}
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        method_name, knobs = VARIANTS[name]
        method = make_config(method_name, {**lora_knobs, **knobs})
        results[name] = measure_variant(name, spec, method, train, args.device, args.warmup, args.steps,
                                        args.seed, args.lr, gpu)
        print(f"  {name}: {results[name]['tokens_per_s']:.1f} tokens/s, peak "
              f"{results[name]['peak_allocated_bytes'] / 2**20:.2f} MiB", flush=True)
    result = {
        "config": {"model": spec.name, "device": args.device, "gpu": gpu.name if gpu else None,
                   "micro_batch_size": args.batch, "seq_len": args.seq_len, "precision": "bf16",
                   "gradient_checkpointing": args.checkpointing, "loss": args.loss, "optimizer": "adamw", "r": args.r,
                   "lora_alpha": args.lora_alpha, "target_modules": "all-linear", "warmup_steps": args.warmup,
                   "timed_steps": args.steps, "seed": args.seed, "cpu_threads": torch.get_num_threads()},
        "note": CPU_NOTE if args.device == "cpu" else None,
        "variants": list(results.values()),
        "skipped_variants": skipped,
        "ratios": ratios(results),
        "ratio_table": nested(ratios(results)),
        "nf4_dequantize": nf4_dequantize(args.device, args.nf4_rows, args.nf4_cols, args.nf4_repeats, with_bnb, gpu),
        "env": records.environment(args.device),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    if args.device == "cpu":
        print(f"NOTE: {CPU_NOTE}")
    return 0


def _guarded_main() -> int:
    """``main`` with a user error (e.g. a shape the bitsandbytes CPU path refuses) as one line and exit 2."""
    from lorabench.errors import UserError

    try:
        return main()
    except UserError as err:
        print(f"bench_qlora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(_guarded_main())
