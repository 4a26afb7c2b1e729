"""Work of one op class: FLOPs, bytes moved to/from device memory, kernel launches (stdlib only).

The time of an op class on a device is a roofline (Williams et al. 2009, "Roofline: an insightful visual
performance model", CACM 52(4), https://doi.org/10.1145/1498765.1498785) plus a fixed cost per kernel:

    t = max(flops / (peak * eff_flops), bytes / (bandwidth * eff_bytes)) + kernels * kernel_overhead_s

Summing that over op classes (each with its own efficiency) rather than over the whole step keeps
compute-bound matmuls and memory-bound elementwise ops from hiding each other.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Op classes, in the order plan prints them. Each has its own efficiency in conf/calibration/time-*.yaml.
OP_CLASSES: tuple[str, ...] = (
    "matmul_forward", "matmul_input_grad", "matmul_weight_grad", "attention", "recompute", "adapter",
    "dequant", "elementwise", "loss", "optimizer", "communication",
)


@dataclass(frozen=True)
class Work:
    """FLOPs, bytes and kernels of some ops (all per micro-step on one GPU unless said otherwise)."""

    flops: float = 0.0
    bytes: float = 0.0
    kernels: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.bytes + other.bytes, self.kernels + other.kernels)

    def __mul__(self, k: float) -> "Work":
        return Work(self.flops * k, self.bytes * k, self.kernels * k)

    __rmul__ = __mul__


ZERO = Work()


def total(works: "list[Work] | tuple[Work, ...]") -> Work:
    out = ZERO
    for w in works:
        out = out + w
    return out
