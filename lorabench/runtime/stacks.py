"""The model a job trains, built by the code of its stack (``TrainSpec.stack``)."""

from __future__ import annotations

from torch import nn

from lorabench.methods.base import MethodConfig
from lorabench.runtime.build import prepare_model
from lorabench.runtime.peft_stack import build_peft_model
from lorabench.specs import ModelSpec, TrainSpec


def build_for_stack(spec: ModelSpec, method_cfg: MethodConfig, train: TrainSpec, *, device: str = "cpu",
                    seed: int = 0) -> nn.Module:
    """lorabench's modules (:func:`lorabench.runtime.build.prepare_model`), or on the PEFT stack PEFT's over
    transformers (+ bitsandbytes for QLoRA: :func:`lorabench.runtime.peft_stack.build_peft_model`)."""
    if train.stack == "peft":
        return build_peft_model(spec, method_cfg, train, device=device, seed=seed)
    return prepare_model(spec, method_cfg, train, device=device, seed=seed)
