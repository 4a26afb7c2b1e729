"""IA3 config with PEFT's names (peft.IA3Config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorabench.methods.base import MethodConfig


@dataclass(frozen=True)
class IA3Config(MethodConfig):
    """Learned vectors rescale activations: outputs of attention targets, inputs of feed-forward targets."""

    name: ClassVar[str] = "ia3"
    target_modules: str | tuple[str, ...] | None = None
    """Module-name suffixes or None for PEFT's default (Llama: k_proj, v_proj, down_proj)."""
    feedforward_modules: str | tuple[str, ...] | None = None
    """Subset of targets that scale their input (in_features) rather than their output."""
