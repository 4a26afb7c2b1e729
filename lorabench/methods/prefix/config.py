"""Prefix-tuning config with PEFT's names (peft.PrefixTuningConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorabench.errors import require
from lorabench.methods.base import MethodConfig


@dataclass(frozen=True)
class PrefixConfig(MethodConfig):
    """Trainable key/value prefixes of ``num_virtual_tokens`` positions in every layer."""

    name: ClassVar[str] = "prefix"
    num_virtual_tokens: int = 20
    """Prefix length V: attention runs over V + T keys."""
    prefix_projection: bool = False
    """Reparameterize through an MLP (embedding V x D -> Linear(D, H) -> tanh -> Linear(H, 2 L D))."""
    encoder_hidden_size: int | None = None
    """H of the projection MLP; None means PEFT's token_dim D = head_dim * num_key_value_heads."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.num_virtual_tokens > 0, f"num_virtual_tokens={self.num_virtual_tokens} must be positive",
                "pass --num-virtual-tokens 20")
        require(self.encoder_hidden_size is None or self.encoder_hidden_size > 0,
                f"encoder_hidden_size={self.encoder_hidden_size} must be positive", "omit it to use hidden_size")
