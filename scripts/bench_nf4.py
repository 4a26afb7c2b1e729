"""Micro-benchmark: NF4 quantize/dequantize of one weight, lorabench vs bitsandbytes, side by side.

Times ``quantize`` (double quantization on) and ``dequantize`` (to the weight dtype) of a
``--rows x --cols`` weight (default 4096 x 4096, bf16) on the CPU and, when present, on CUDA, where the Triton
kernel (``lorabench-triton``, dequantize only) is timed beside the torch path (``lorabench``) and bitsandbytes.
Reports the median time and the effective bandwidth ``(bytes read + bytes written) / time``:

- dequantize reads the NF4 storage (``nf4_storage_bytes``: packed codes + absmax codes + nested absmax
  + offset) and writes ``numel * itemsize`` bytes;
- quantize reads ``numel * itemsize`` bytes and writes the NF4 storage.

Usage::

    python scripts/bench_nf4.py                       # print the table
    python scripts/bench_nf4.py --out results/nf4_bench.json --repeats 20

Not run by pytest.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorabench.quant import triton_nf4  # noqa: E402
from lorabench.quant.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402
from lorabench.quant.sizes import nf4_storage_bytes  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _time_s(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in seconds (CUDA synchronized around each call)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times_s = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times_s.append(time.perf_counter() - start)
    return statistics.median(times_s)


def _backends(w: torch.Tensor, no_bnb: bool) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (quantize fn, dequantize fn) for each available backend."""
    q = quantize_nf4(w, double_quant=True)
    out = {"lorabench": (lambda: quantize_nf4(w, double_quant=True), lambda: dequantize_nf4(q))}
    if w.device.type == "cuda" and triton_nf4.can_run_on(w.device):  # the Triton kernel (dequantize only)
        out["lorabench-triton"] = (None, lambda: triton_nf4.dequantize_nf4_triton(q))
    if no_bnb:
        return out
    try:
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        import bitsandbytes.functional as bnbf
    except ImportError:
        print("bitsandbytes not installed: lorabench only", file=sys.stderr)
        return out

    def bnb_quantize() -> Any:
        return bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)

    packed, state = bnb_quantize()
    out["bitsandbytes"] = (bnb_quantize, lambda: bnbf.dequantize_4bit(packed, state))
    return out


def run(rows: int, cols: int, dtype: torch.dtype, devices: list[torch.device], warmup: int,
        repeats: int, no_bnb: bool) -> list[dict[str, Any]]:  # fmt: skip
    numel = rows * cols
    weight_bytes = numel * torch.empty(0, dtype=dtype).element_size()
    nf4_bytes = nf4_storage_bytes(numel, double_quant=True)
    records = []
    for device in devices:
        torch.manual_seed(0)
        w = torch.randn(rows, cols, device=device).to(dtype)
        for name, (quantize, dequantize) in _backends(w, no_bnb).items():
            for op, fn, moved_bytes in (("quantize", quantize, weight_bytes + nf4_bytes),
                                        ("dequantize", dequantize, nf4_bytes + weight_bytes)):  # fmt: skip
                if fn is None:
                    continue
                seconds = _time_s(fn, device, warmup, repeats)
                records.append({"device": str(device), "backend": name, "op": op,
                                "time_ms": seconds * 1e3, "bytes_moved": moved_bytes,
                                "gb_per_s": moved_bytes / seconds / 1e9})  # fmt: skip
    return records


def _table(records: list[dict[str, Any]]) -> str:
    header = ["device", "op", "backend", "time_ms", "GB/s"]
    rows = [[r["device"], r["op"], r["backend"], f"{r['time_ms']:.3f}", f"{r['gb_per_s']:.3g}"]
            for r in sorted(records, key=lambda r: (r["device"], r["op"], r["backend"]))]  # fmt: skip
    try:
        from tabulate import tabulate

        return tabulate(rows, headers=header, tablefmt="github")
    except ImportError:
        return "\n".join("  ".join(f"{c:>12}" for c in row) for row in [header, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--no-bnb", action="store_true", help="time lorabench only")
    parser.add_argument("--out", type=Path, default=None, help="write the records as JSON here")
    args = parser.parse_args(argv)

    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    records = run(args.rows, args.cols, DTYPES[args.dtype], devices, args.warmup, args.repeats, args.no_bnb)
    print(f"NF4 (blocksize 64, double quant) of a {args.rows}x{args.cols} {args.dtype} weight; "
          f"median of {args.repeats}")  # fmt: skip
    print(_table(records))
    if args.out is not None:
        try:
            import bitsandbytes

            bnb_version = bitsandbytes.__version__
        except ImportError:
            bnb_version = None
        meta = {"torch": torch.__version__, "bitsandbytes": bnb_version, "python": platform.python_version(),
                "cpu_threads": torch.get_num_threads(),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}  # fmt: skip
        config = {"rows": args.rows, "cols": args.cols, "dtype": args.dtype, "repeats": args.repeats}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": config, "meta": meta, "records": records}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
