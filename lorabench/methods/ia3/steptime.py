"""IA3's step-time terms (torch-free; Liu et al. 2022, arXiv:2205.05638): one elementwise scale per target.

A non-feed-forward target scales its output (f = out_features), a feed-forward one its input
(f = in_features): forward reads and writes T*f elements (one kernel); backward computes the input gradient
(grad * l: 3 passes) and the vector's gradient (grad * x summed over tokens: 2 reads and a reduction), ~5 passes
of T*f. ~3 aten ops forward and 5 backward per target. No matmul FLOPs worth counting.
"""

from __future__ import annotations

from lorabench.methods.terms import no_extra_dequant as extra_dequant_work  # noqa: F401
from lorabench.methods.terms import no_fold_work as fold_work  # noqa: F401
from lorabench.methods.ia3 import memory
from lorabench.methods.ia3.config import IA3Config
from lorabench.specs import DTYPE_BYTES, ModelSpec, TrainSpec
from lorabench.steptime.work import Work


def adapter_work(model: ModelSpec, cfg: IA3Config, train: TrainSpec) -> tuple[Work, Work]:
    t, e = train.tokens_per_step, DTYPE_BYTES[train.compute_dtype]
    widths = [m.in_features if memory.is_feedforward(model, cfg, m) else m.out_features
              for m in memory.targets(model, cfg)]
    elems = t * sum(widths) * model.num_layers
    n = len(widths) * model.num_layers
    return Work(elems, 2 * e * elems, 3 * n), Work(2 * elems, 5 * e * elems, 5 * n)


def dequant_work(model: ModelSpec, cfg: IA3Config, train: TrainSpec, device_kind: str = "gpu") -> Work:
    return Work()


def trainable_tensors(model: ModelSpec, cfg: IA3Config) -> int:
    return len(memory.targets(model, cfg)) * model.num_layers
