"""Full fine-tuning's step-time terms (torch-free): no method ops; every base tensor trains (the weight
gradients and the optimizer over all of them are counted by the core from ``trains_base``)."""

from __future__ import annotations

from lorabench.methods.terms import no_extra_dequant as extra_dequant_work  # noqa: F401
from lorabench.methods.terms import no_fold_work as fold_work  # noqa: F401
from lorabench.methods.full.config import FullConfig
from lorabench.specs import ModelSpec, TrainSpec
from lorabench.steptime.work import Work


def adapter_work(model: ModelSpec, cfg: FullConfig, train: TrainSpec) -> tuple[Work, Work]:
    return Work(), Work()


def dequant_work(model: ModelSpec, cfg: FullConfig, train: TrainSpec, device_kind: str = "gpu") -> Work:
    return Work()


def trainable_tensors(model: ModelSpec, cfg: FullConfig) -> int:
    """Every weight, bias and norm tensor: per layer its matrices, biases and norms; embeddings, head, final norm."""
    norms = model.traits.norms_per_layer
    norm_tensors = norms * (2 if model.norm_kind == "layernorm" else 1)
    per_layer = sum(1 + (1 if m.bias else 0) for m in model.matrices) + norm_tensors
    head = 0 if model.tie_word_embeddings else 1
    pos = 1 if model.position_embedding_params else 0
    return model.num_layers * per_layer + 1 + head + pos + (2 if model.norm_kind == "layernorm" else 1)
