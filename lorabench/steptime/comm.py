"""Data-parallel communication per optimizer step (torch-free).

Ring collectives (Patarasuk & Yuan 2009, "Bandwidth optimal all-reduce algorithms for clusters of
workstations", JPDC 69(2); NCCL's performance notes, https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md):
each rank sends (N-1)/N of the buffer in a reduce-scatter or an all-gather and 2(N-1)/N in an all-reduce.
Volumes per rank (Rajbhandari et al. 2020, ZeRO, arXiv:1910.02054, Sec. 7):

* ``none`` (DDP): all-reduce of the gradients, once per optimizer step (no_sync during accumulation);
* ``zero1``/``zero2``: reduce-scatter of the gradients + all-gather of the updated trainable weights, the
  same 2(N-1)/N G as DDP;
* ``zero3`` (FSDP full shard): per micro-step an all-gather of every weight in forward and again in backward
  (the weights are resharded after forward) and a reduce-scatter of the gradients: 1.5x DDP's volume when all
  weights train.

The link is NVLink inside the GPU's NVLink domain, PCIe beyond it (:meth:`GpuSpec.link_bytes_per_s`).
"""

from __future__ import annotations

from lorabench.specs import GpuSpec, TrainSpec
from lorabench.steptime.work import Work


def communication_bytes(train: TrainSpec, gradient_bytes: float, weight_bytes: float) -> tuple[float, int]:
    """(bytes each rank sends per optimizer step, collectives per step)."""
    n = train.num_gpus
    if n <= 1:
        return 0.0, 0
    frac = (n - 1) / n
    if train.sharding == "zero3":
        per_micro = 2 * frac * weight_bytes + frac * gradient_bytes
        return per_micro * train.grad_accum_steps, 3 * train.grad_accum_steps
    return 2 * frac * gradient_bytes, 2


def communication(train: TrainSpec, device: GpuSpec, gradient_bytes: float, weight_bytes: float) -> tuple[Work, float]:
    """(the step's communication as Work, the link's one-direction bytes/s). Bytes go over the link, not HBM."""
    nbytes, collectives = communication_bytes(train, gradient_bytes, weight_bytes)
    return Work(0.0, nbytes, collectives), device.link_bytes_per_s(train.num_gpus)
