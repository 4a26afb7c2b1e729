"""Measure this CPU as a lorabench device entry: matmul FLOP/s, memory bandwidth, per-op overhead.

Single-threaded (``torch.set_num_threads(1)``, the setting of the CPU validation sweep), medians of
``--repeats`` timings, written as a catalog entry (the GpuSpec fields) to ``conf/cpu/<name>.yaml`` so that
``lorabench plan --gpu <name>`` predicts CPU step times:

* ``bf16_flops_per_s`` / ``fp32_flops_per_s``: 2*n^3 / time of an n x n x n ``torch.mm`` (n = ``--n``);
* ``memory_bandwidth_bytes_per_s``: bytes read + written / time of ``dst.copy_(src)`` on ``--copy-mib`` MiB
  (far above the caches), the STREAM "copy" kernel (McCalpin, https://www.cs.virginia.edu/stream/);
* ``op_overhead_s``: time of one tiny elementwise op (8 elements) = the eager dispatcher's fixed cost per
  kernel, the CPU's counterpart of a GPU launch.

The machine is shared with other jobs (``os.getloadavg()`` is recorded): the numbers are this machine's
under that load, never a GPU's.

    python scripts/bench_cpu_device.py --name cpu-epyc-1t
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _median_s(fn, repeats: int, inner: int = 1) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def matmul_flops_per_s(n: int, dtype: torch.dtype, repeats: int) -> float:
    """2 n^3 FLOPs of an n x n x n matmul over its median time."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _median_s(lambda: torch.mm(a, b), repeats)


def copy_bytes_per_s(mib: int, repeats: int) -> float:
    """(read + write) bytes of a large copy over its median time (STREAM copy)."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _median_s(lambda: dst.copy_(src), repeats)


def op_overhead_s(repeats: int) -> float:
    """Median time of one ``add`` on 8 elements (fixed per-op cost of eager dispatch)."""
    x = torch.ones(8)
    return _median_s(lambda: torch.add(x, x), repeats, inner=2000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="cpu-1t")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--copy-mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "conf" / "cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    fp32 = matmul_flops_per_s(args.n, torch.float32, args.repeats)
    bf16 = matmul_flops_per_s(args.n, torch.bfloat16, args.repeats)
    bw = copy_bytes_per_s(args.copy_mib, args.repeats)
    overhead = op_overhead_s(args.repeats)
    load_after = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = f"""# {cpu}, 1 thread, measured by scripts/bench_cpu_device.py on {when} (torch {torch.__version__}).
# Shared machine: load average (1, 5, 15 min) {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} before,
# {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} after. CPU figures, never a GPU's.
# Matmul: {args.n}^3 torch.mm medians of {args.repeats}; bandwidth: copy_ of {args.copy_mib} MiB (read+write);
# kernel_overhead_s: one 8-element add (eager dispatch cost per op). docs/SOURCES.md#cpu-device.
name: {args.name}
display: {cpu} (1 thread)
aliases: []
kind: cpu
memory_bytes: {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')}
bf16_flops_per_s: {bf16:.4g}
fp16_flops_per_s: {bf16:.4g}
fp32_flops_per_s: {fp32:.4g}
memory_bandwidth_bytes_per_s: {bw:.4g}
kernel_overhead_s: {overhead:.4g}
interconnect: none
interconnect_bidirectional_bytes_per_s: {bw:.4g}
pcie_bidirectional_bytes_per_s: {bw:.4g}
nvlink_domain_gpus: 1
usd_per_hour: 0
price_date: '{when[:10]}'
price_source: cpu-device
spec_source: cpu-device
"""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{args.name}.yaml"
    out.write_text(text.replace("e+", "e+"))
    print(text)


if __name__ == "__main__":
    main()
