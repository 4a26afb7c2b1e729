"""Bottleneck-adapter config with the adapters library's names (DoubleSeqBnConfig = Houlsby)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorabench.errors import require
from lorabench.methods.base import MethodConfig

PLACEMENTS = ("double_seq_bn", "seq_bn")


@dataclass(frozen=True)
class AdaptersConfig(MethodConfig):
    """x + up(act(down(x))) after sublayers; m = hidden_size // reduction_factor."""

    name: ClassVar[str] = "adapters"
    reduction_factor: int = 16
    """Bottleneck width m = hidden_size // reduction_factor."""
    placement: str = "double_seq_bn"
    """'double_seq_bn' (Houlsby: after attention and after the MLP) or 'seq_bn' (Pfeiffer: after the MLP)."""
    non_linearity: str = "swish"
    """The bottleneck's activation: swish (SiLU), the adapters library's default."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.reduction_factor > 0, f"reduction_factor={self.reduction_factor} must be positive",
                "pass --reduction-factor 16")
        require(self.placement in PLACEMENTS, f"adapter placement {self.placement!r} is unknown",
                f"use one of {', '.join(PLACEMENTS)}")

    @property
    def adapters_per_layer(self) -> int:
        return 2 if self.placement == "double_seq_bn" else 1
