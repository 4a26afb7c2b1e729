"""``lorabench gpus``: the GPU catalog (memory, dense peaks, bandwidth, interconnect, price)."""

from __future__ import annotations

import argparse

from lorabench.catalog import all_gpus
from lorabench.commands.common import add_format_arg
from lorabench.render import render
from lorabench.units import gib


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpus", help="list catalog GPUs: memory, dense bf16/fp16 peaks, bandwidth, link, price")
    add_format_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = [{"name": g.name, "aliases": ", ".join(g.aliases), "memory GiB": gib(g.memory_bytes, 1),
             "bf16 TFLOP/s": f"{g.bf16_flops_per_s / 1e12:.0f}", "fp16 TFLOP/s": f"{g.peak_flops_per_s('fp16') / 1e12:.0f}",
             "bandwidth GB/s": f"{g.memory_bandwidth_bytes_per_s / 1e9:.0f}",
             "link GB/s": f"{g.interconnect} {g.interconnect_bidirectional_bytes_per_s / 1e9:g}",
             "USD/h": f"{g.usd_per_hour:.2f}" if g.usd_per_hour else "-", "price date": g.price_date or "-"}
            for g in all_gpus()]
    print(render(rows, args.format))
    return 0
