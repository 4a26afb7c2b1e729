"""Notes ``plan`` prints under the breakdown when a choice has a consequence the table does not show.

Sources: PEFT's handling of fused MoE parameters (docs/SOURCES.md#peft-moe-conversion,
docs/SOURCES.md#peft-param-fold) and bitsandbytes' (docs/SOURCES.md#bnb-fused-experts)."""

from __future__ import annotations

from lorabench.memory.planner import Prediction
from lorabench.methods import MethodConfig
from lorabench.methods.fused_experts import fused_matrices, peft_all_linear_extra_params
from lorabench.methods.lora.config import LoraConfig
from lorabench.methods.lora.experts_memory import raw_adapter_params, raw_targets
from lorabench.methods.targets import select
from lorabench.specs import DTYPE_BYTES, ModelSpec, TrainSpec
from lorabench.units import gib, human_count


def method_notes(model: ModelSpec, method: MethodConfig, pred: Prediction, train: TrainSpec) -> list[str]:
    """One line per consequence worth saying; empty for the common case."""
    if not isinstance(method, LoraConfig) or not fused_matrices(model):  # LoRA and QLoRA
        return []
    targets = select(model, method.target_modules, model.traits.lora_default_targets, method.name)
    raw = raw_targets(model, method)
    modules = ", ".join(m.leaf for m in targets)
    if raw:
        folded = gib(sum(m.copies * m.in_features * m.out_features for m in raw) * DTYPE_BYTES[train.param_dtype])
        notes = [f"note: LoRA trains {modules} and, through target_parameters, "
                 f"{', '.join(m.parameter_path for m in raw)} ({human_count(pred.trainable_params)} parameters)."]
        if any(method.routes(m) for m in raw):
            notes.append("note: experts_path=routed: the routed tokens go through A and B beside the frozen experts; "
                         "nothing weight-sized is made or saved (PEFT's fold would add "
                         f"{folded} GiB a layer).")
        elif any(m.copies > 1 for m in raw):
            notes.append(f"note: each layer's forward folds W + B A into a full-size copy of the adapted expert "
                         f"tensors ({folded} GiB a layer), saved for backward: gradient checkpointing keeps "
                         f"one layer's; --experts-path routed (lorabench's runtime) makes none.")
    else:
        notes = [f"note: {model.display}'s router and experts are raw parameters, not nn.Linear modules: LoRA "
                 f"trains {modules} only ({human_count(pred.trainable_params)} parameters); pass "
                 f"--target-parameters experts to adapt the experts too."]
    if method.target_modules == "all-linear" and train.stack == "peft" and raw:
        notes.append("note: PEFT's all-linear (peft 0.21, transformers 5) also wraps the router and experts "
                     "(gate_up_proj at rank 2r, alpha 2 alpha): planned so, as the PEFT stack runs it.")
    elif method.target_modules == "all-linear":
        extra = peft_all_linear_extra_params(model, method.r)
        notes.append(f"note: PEFT's all-linear (peft 0.21, transformers 5) wraps the router and experts too "
                     f"(gate_up_proj at rank 2r): {human_count(pred.trainable_params - raw_adapter_params(model, method) + extra)} "
                     f"trainable; lorabench's all-linear means nn.Linear modules, target_parameters the rest.")
    if pred.components.get("quantized_weights", 0) > 0:
        notes.append("note: 4-bit loading replaces nn.Linear modules only: the router and experts stay in 16-bit "
                     "(as with transformers + bitsandbytes, bitsandbytes#1849).")
    return notes

