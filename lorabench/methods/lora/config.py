"""LoRA config with PEFT's defaults and names (peft.LoraConfig)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from lorabench.errors import require
from lorabench.methods.base import MethodConfig


@dataclass(frozen=True)
class LoraConfig(MethodConfig):
    """Low-rank update W + (alpha/r) * B A on each targeted linear (Hu et al. 2021, eq. 3)."""

    name: ClassVar[str] = "lora"
    FLAG_ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {"use_rslora": ("--rslora", "--use-rslora")}
    COMPARE_VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {"dora": {"use_dora": True}}
    r: int = 8
    """Rank of A (r x in) and B (out x r)."""
    lora_alpha: float = 8
    """Scaling numerator: scaling = alpha / r (alpha / sqrt(r) with rsLoRA)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input; p > 0 keeps one extra copy of each targeted module's input."""
    target_modules: str | tuple[str, ...] | None = None
    """Module-name suffixes, 'all-linear', or None for PEFT's per-architecture default (q_proj, v_proj)."""
    target_parameters: str | tuple[str, ...] | None = None
    """Raw parameters to adapt as PEFT's ``target_parameters`` (suffixes of parameter paths such as
    mlp.experts.gate_up_proj, or 'experts' for every fused expert tensor): Mixtral's fused experts (E x out x in)
    get lora_A (r E x in) and lora_B (out x r E); no dropout, DoRA or Conv1D there, as in PEFT."""
    use_rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(r) (Kalajdzievski 2023, arXiv:2312.03732)."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024, arXiv:2402.09353): a trainable magnitude per output feature rescales each row of
    W + scaling * B A to it; the detached row norm materializes a weight-sized tensor per adapted layer."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(int(self.r) == self.r and self.r > 0, f"lora rank r={self.r} must be a positive integer",
                "pass --r 8 (or any integer >= 1)")
        require(0.0 <= self.lora_dropout < 1.0, f"lora_dropout={self.lora_dropout} is outside [0, 1)",
                "pass --lora-dropout 0.05 for example")
        if self.target_parameters:
            require(self.lora_dropout == 0, "lora_dropout must be 0 with target_parameters (PEFT's ParamWrapper "
                    "cannot apply dropout to a raw parameter's input)", "pass --lora-dropout 0")
            require(not self.use_dora, "DoRA does not apply to target_parameters (PEFT's ParamWrapper refuses it)",
                    "drop --use-dora, or target nn.Linear modules only")
        require(self.lora_alpha > 0, f"lora_alpha={self.lora_alpha} must be positive", "pass --lora-alpha 16")

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
