"""Bottleneck adapters' step-time terms (torch-free; Houlsby et al. 2019, arXiv:1902.00751).

Per adapter (down h -> m, swish, up m -> h, residual add, both casts when the adapter dtype differs from the
compute dtype) and token: 4hm FLOPs forward, 8hm backward; bytes: the cast of x (h(e + a)), down reading x
and writing m (a(h + m)), the activation (2am), up (a(m + h)), the add (3ah) and the cast back (h(a + e)); ~12 aten ops forward, 24 backward per adapter.
"""

from __future__ import annotations

from lorabench.methods.terms import no_extra_dequant as extra_dequant_work  # noqa: F401
from lorabench.methods.terms import no_fold_work as fold_work  # noqa: F401
from lorabench.methods.terms import adapter_dtype
from lorabench.methods.adapters.config import AdaptersConfig
from lorabench.methods.adapters.memory import bottleneck
from lorabench.specs import DTYPE_BYTES, ModelSpec, TrainSpec
from lorabench.steptime.work import Work


def adapter_work(model: ModelSpec, cfg: AdaptersConfig, train: TrainSpec) -> tuple[Work, Work]:
    t, e, h = train.tokens_per_step, DTYPE_BYTES[train.compute_dtype], model.hidden_size
    a = DTYPE_BYTES[adapter_dtype(cfg, train)]
    m = bottleneck(model, cfg)
    cast = a != e
    per_token = (2 * h * (e + a) if cast else 0) + a * (h + m) + 2 * a * m + a * (m + h) + 3 * a * h
    n = model.num_layers * cfg.adapters_per_layer
    fwd = Work(4.0 * t * h * m, t * per_token + 2 * h * m * a, 12) * n
    return fwd, Work(2 * fwd.flops, 2 * fwd.bytes, 24 * n)


def dequant_work(model: ModelSpec, cfg: AdaptersConfig, train: TrainSpec, device_kind: str = "gpu") -> Work:
    return Work()


def trainable_tensors(model: ModelSpec, cfg: AdaptersConfig) -> int:
    """Two weights and two biases per adapter."""
    return 4 * cfg.adapters_per_layer * model.num_layers
