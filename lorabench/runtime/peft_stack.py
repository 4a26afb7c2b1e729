"""The PEFT stack: the same model built with PEFT's own modules (``peft.get_peft_model``), for tracing the
code a Hugging Face user runs (``lorabench trace --stack peft``).

LoRA only (``lora``): PEFT's ``LoraConfig`` with lorabench's knobs, adapters in fp32 as PEFT's
``autocast_adapter_dtype=True`` keeps them (or cast to the method's ``adapter_dtype``), then what
``prepare_model_for_kbit_training`` / the Trainer do, by the TrainSpec: checkpointing (transformers' own) and
the input embeddings' output requiring grad. QLoRA's bitsandbytes ``Linear4bit`` cannot be built under fake
tensors (quantization reads values), so QLoRA is refused here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorabench.errors import UserError
from lorabench.methods.base import MethodConfig
from lorabench.specs import ModelSpec, TrainSpec

STACKS: tuple[str, ...] = ("lorabench", "peft")


def supports(cfg: MethodConfig) -> bool:
    """Whether this builder can translate the config into PEFT's: a plain LoraConfig (not QLoRA's subclass)."""
    from lorabench.methods.lora.config import LoraConfig

    return type(cfg) is LoraConfig


def build_peft_model(spec: ModelSpec, cfg: MethodConfig, train: TrainSpec, *, device: str = "meta",
                     seed: int = 0) -> nn.Module:
    """``get_peft_model`` on the transformers model of ``spec`` (meta by default, for the tracer).

    Raises:
        UserError: a method other than LoRA (the PEFT stack traces LoRA only).
    """
    if not supports(cfg):
        raise UserError(f"--stack peft traces LoRA only, not {cfg.name}",
                        "use --stack lorabench (the default) for the other methods")
    from peft import LoraConfig, get_peft_model

    from lorabench.runtime.build import TORCH_DTYPES, build_model

    model = build_model(spec, train, device=device, seed=seed)
    targets: Any = cfg.target_modules
    if targets is None:
        from lorabench.methods.lora.memory import targets as lora_targets

        targets = sorted({m.leaf for m in lora_targets(spec, cfg)})
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora,
                        target_modules=targets if targets == "all-linear" else list(targets), bias="none",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=cfg.adapter_dtype == "fp32")
    if cfg.adapter_dtype in ("bf16", "fp16"):
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(TORCH_DTYPES[cfg.adapter_dtype])
    if train.gradient_checkpointing:
        base = peft_model.get_base_model()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if train.prepare_kbit:
            base.enable_input_require_grads()
        else:
            base.disable_input_require_grads()
    return peft_model


def peft_versions() -> dict[str, str]:
    import peft

    return {"peft": peft.__version__, "torch": torch.__version__}
