"""The PEFT stack: the same model built with PEFT's own modules (``peft.get_peft_model``), for tracing the
code a Hugging Face user runs (``lorabench trace --stack peft``).

LoRA (``lora``): PEFT's ``LoraConfig`` with lorabench's knobs, adapters in fp32 as PEFT's
``autocast_adapter_dtype=True`` keeps them (or cast to the method's ``adapter_dtype``), then what
``prepare_model_for_kbit_training`` / the Trainer do, by the TrainSpec: checkpointing (transformers' own) and
the input embeddings' output requiring grad. QLoRA (``qlora``): bitsandbytes' own ``Linear4bit`` layers holding
meta packed weights and quantization states of bitsandbytes' shapes (:mod:`lorabench.runtime.bnb_stack`; no
quantization runs), wrapped by PEFT's 4-bit LoRA layers, with ``prepare_model_for_kbit_training`` itself when
``TrainSpec.prepare_kbit`` is set.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from lorabench.errors import UserError
from lorabench.methods.base import MethodConfig
from lorabench.recipes import peft_stack_supports
from lorabench.specs import ModelSpec, TrainSpec

def _base_model(spec: ModelSpec, cfg: MethodConfig, train: TrainSpec, device: str, seed: int,
                quantized: bool) -> nn.Module:
    """The transformers model before PEFT: bitsandbytes' 4-bit layers for QLoRA (meta ones for the tracer,
    quantized ones on a real device, :mod:`lorabench.runtime.bnb_load`), else 16-bit, built on the device."""
    from lorabench.runtime.build import TORCH_DTYPES, build_model, build_on_device

    if quantized and device != "meta":
        from lorabench.runtime.bnb_load import load_4bit

        return load_4bit(spec, train, double_quant=cfg.double_quant, compute_dtype=TORCH_DTYPES[cfg.compute_dtype],
                         device=device, seed=seed)
    if torch.device(device).type not in ("cpu", "meta"):  # a GPU: never a CPU init of the full model
        return build_on_device(spec, train, device=device, seed=seed)
    model = build_model(spec, train, device=device, seed=seed)
    if quantized:
        from lorabench.runtime.bnb_stack import quantize_linears

        quantize_linears(model, double_quant=cfg.double_quant, compute_dtype=TORCH_DTYPES[cfg.compute_dtype],
                         weight_dtype=TORCH_DTYPES[train.load_dtype])
    return model


def build_peft_model(spec: ModelSpec, cfg: MethodConfig, train: TrainSpec, *, device: str = "meta",
                     seed: int = 0) -> nn.Module:
    """``get_peft_model`` on the transformers model of ``spec`` (meta by default, for the tracer).

    Raises:
        UserError: a method other than LoRA/QLoRA (the PEFT stack traces LoRA and QLoRA only).
    """
    if not peft_stack_supports(cfg):
        raise UserError(f"--stack peft traces LoRA and QLoRA (NF4, blocksize 64, no DoRA) only, not {cfg.name}",
                        "use --stack lorabench (the default) for the other methods")
    quantized = type(cfg).__name__ == "QLoraConfig"
    if quantized:  # before PEFT imports it: bitsandbytes' import warns about an optional CPU kernel package
        from lorabench.quant.bnb_backend import import_bitsandbytes

        import_bitsandbytes()
    from peft import LoraConfig, get_peft_model

    from lorabench.runtime.build import TORCH_DTYPES

    model = _base_model(spec, cfg, train, device, seed, quantized)
    if quantized:
        if train.prepare_kbit:
            from peft import prepare_model_for_kbit_training

            # PEFT's freeze and fp32 cast; its checkpointing step (input require-grads, then transformers'
            # non-reentrant checkpointing) is the one below, through transformers' non-deprecated name.
            with warnings.catch_warnings():  # it asks transformers' deprecated `is_gradient_checkpointing`
                warnings.simplefilter("ignore", FutureWarning)
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets: Any = cfg.target_modules
    if targets is None:
        from lorabench.methods.lora.memory import targets as lora_targets

        targets = sorted({m.leaf for m in lora_targets(spec, cfg)})
    from lorabench.methods.fused_experts import select_parameters
    raw = [m.parameter_path for m in select_parameters(spec, cfg.target_parameters, cfg.name)]
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora,
                        target_modules=targets if targets == "all-linear" else list(targets), bias="none",
                        target_parameters=raw or None, task_type="CAUSAL_LM",
                        rank_pattern=cfg.peft_rank_pattern, alpha_pattern=cfg.peft_alpha_pattern)
    with warnings.catch_warnings():  # for a 4-bit model PEFT asks the deprecated `is_gradient_checkpointing` too
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=cfg.adapter_dtype == "fp32")
    if cfg.adapter_dtype in ("bf16", "fp16"):
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(TORCH_DTYPES[cfg.adapter_dtype])
    from lorabench.runtime.build import cast_norms

    cast_norms(peft_model, train.norm_dtype)
    if train.gradient_checkpointing:
        from lorabench.runtime.build import enable_gradient_checkpointing

        enable_gradient_checkpointing(peft_model.get_base_model(), input_require_grads=train.prepare_kbit)
    return peft_model
