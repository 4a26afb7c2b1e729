"""Full fine-tuning config (no knobs: every parameter is trained)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorabench.methods.base import MethodConfig, Pairing


@dataclass(frozen=True)
class FullConfig(MethodConfig):
    """Every parameter trainable, kept in the training precision's parameter dtype."""

    name: ClassVar[str] = "full"
    PAIRINGS: ClassVar[tuple[Pairing, ...]] = (
        Pairing("full", "lora", "full fine-tuning vs LoRA", in_report=False),)
