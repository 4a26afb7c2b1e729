"""Notes ``plan`` prints under the breakdown when a choice has a consequence the table does not show.

Sources: PEFT's handling of fused MoE parameters (docs/SOURCES.md#peft-moe-conversion) and bitsandbytes'
(docs/SOURCES.md#bnb-fused-experts)."""

from __future__ import annotations

from lorabench.memory.planner import Prediction
from lorabench.methods import MethodConfig
from lorabench.methods.fused_experts import fused_matrices, peft_all_linear_extra_params
from lorabench.methods.lora.config import LoraConfig
from lorabench.methods.targets import select
from lorabench.specs import ModelSpec
from lorabench.units import human_count


def method_notes(model: ModelSpec, method: MethodConfig, pred: Prediction) -> list[str]:
    """One line per consequence worth saying; empty for the common case."""
    if not isinstance(method, LoraConfig) or not fused_matrices(model):  # LoRA and QLoRA
        return []
    targets = select(model, method.target_modules, model.traits.lora_default_targets, method.name)
    quantized = pred.components.get("quantized_weights", 0) > 0
    stored = " (stored in NF4)" if quantized else ""
    notes = [f"note: {model.display}'s router and experts are raw parameters, not nn.Linear modules: LoRA trains "
             f"{', '.join(m.leaf for m in targets)} only ({human_count(pred.trainable_params)} parameters); "
             f"the experts{stored} get no adapter."]
    if method.target_modules == "all-linear":
        extra = peft_all_linear_extra_params(model, method.r)
        notes.append(f"note: PEFT's all-linear (peft 0.21, transformers 5) also wraps the router and experts "
                     f"(target_parameters; gate_up_proj at rank 2r): {human_count(pred.trainable_params + extra)} "
                     f"trainable; this plan does not include those adapters.")
    if quantized:
        notes.append("note: transformers + bitsandbytes leave fused experts in 16-bit (bitsandbytes#1849); "
                     "this plan stores them in NF4, as a 4-bit expert module would.")
    return notes
