"""Which weight matrices a method targets, with PEFT's matching rules and per-architecture defaults.

PEFT matches a ``target_modules`` entry against a module's full name: equal, or the name ends with
``"." + entry``. ``"all-linear"`` means every ``nn.Linear``/``Conv1D`` except the output head.
Defaults mirror peft.utils.constants (TRANSFORMERS_MODELS_TO_*_MAPPING, peft 0.21); where PEFT has none
(phi3; mixtral's fused experts in transformers >= 5) lorabench's choice is documented inline.
"""

from __future__ import annotations

from typing import Sequence

from lorabench.errors import UserError
from lorabench.specs import MatrixSpec, ModelSpec

LORA_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "phi3": ("qkv_proj",),  # PEFT has no default; the fused qkv is the analogue of q,v
}

IA3_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("k_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"),
    "mixtral": ("k_proj", "v_proj"),  # PEFT's 'w2' no longer exists: experts are fused parameters
    "gpt2": ("c_attn", "mlp.c_proj"),
    "phi3": ("qkv_proj", "down_proj"),
}

IA3_DEFAULT_FEEDFORWARD: dict[str, tuple[str, ...]] = {
    "llama": ("down_proj",),
    "mistral": ("down_proj",),
    "qwen2": ("down_proj",),
    "gemma2": ("down_proj",),
    "mixtral": (),
    "gpt2": ("mlp.c_proj",),
    "phi3": ("down_proj",),
}


def name_matches(module_name: str, target: str) -> bool:
    """PEFT's suffix rule: ``module_name == target`` or it ends with ``'.' + target``."""
    return module_name == target or module_name.endswith("." + target)


def normalize_targets(targets: str | Sequence[str] | None) -> str | tuple[str, ...] | None:
    """Accept ``"all-linear"``, a comma-separated string, a list, or None (architecture default)."""
    if targets is None or targets == "all-linear":
        return targets
    if isinstance(targets, str):
        targets = [t for t in (s.strip() for s in targets.split(",")) if t]
    return tuple(str(t) for t in targets)


def select(model: ModelSpec, targets: str | tuple[str, ...] | None, defaults: dict[str, tuple[str, ...]],
           method: str) -> tuple[MatrixSpec, ...]:
    """The matrices of one decoder layer a method wraps (only ``nn.Linear``-like modules).

    Raises:
        UserError: no default for this architecture, or the targets match nothing.
    """
    linears = model.linear_matrices()
    if targets == "all-linear":
        return linears
    if targets is None:
        if model.model_type not in defaults:
            raise UserError(f"{method} has no default target_modules for model_type {model.model_type!r}",
                            "pass target_modules explicitly")
        targets = defaults[model.model_type]
    chosen = tuple(m for m in linears if any(name_matches(m.name, t) for t in targets))
    if not chosen:
        names = ", ".join(m.name for m in linears)
        raise UserError(f"{method} target_modules {list(targets)} match no module of {model.name}",
                        f"choose among: {names}")
    return chosen
