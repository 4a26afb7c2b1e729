"""Full fine-tuning runtime: every parameter of the model is trainable, in ``train.param_dtype``."""

from __future__ import annotations

from torch import nn

from lorabench.methods.full.config import FullConfig
from lorabench.specs import ModelSpec, TrainSpec


def apply(model: nn.Module, spec: ModelSpec, cfg: FullConfig, train: TrainSpec) -> nn.Module:
    """Mark every parameter trainable (tied embeddings stay one parameter).

    Returns:
        ``model`` itself: fp32 parameters for fp32/bf16-mixed/fp16-mixed, bf16/fp16 ones for bf16/fp16
        (``cfg.adapter_dtype`` does not apply: there is no adapter).
    """
    for param in model.parameters():
        param.requires_grad_(True)
    return model
