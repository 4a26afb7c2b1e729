"""LoRA config with PEFT's defaults and names (peft.LoraConfig)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from lorabench.errors import UserError, require
from lorabench.methods.base import MethodConfig
from lorabench.methods.targets import name_matches


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
    experts_path: str = "fold"
    """How LoRA on fused expert tensors runs: fold (PEFT's ParamWrapper: W + B A materialized for every expert
    in every forward, saved for backward) or routed (lorabench: the routed tokens through A and B beside the
    frozen experts; nothing weight-sized, no weight-gradient matmul)."""
    rank_pattern: str | tuple[str, ...] | None = None
    """PEFT's rank_pattern as name=rank entries: the target whose module path (self_attn.o_proj) or raw
    parameter path (mlp.experts.gate_up_proj) ends with name gets that rank instead of r (first match wins)."""
    alpha_pattern: str | tuple[str, ...] | None = None
    """PEFT's alpha_pattern as name=alpha entries, matched the same way: that target's lora_alpha."""
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
        require(self.experts_path in ("fold", "routed"), f"experts_path {self.experts_path!r} is unknown",
                "use fold (PEFT's ParamWrapper) or routed (lorabench's)")
        if self.target_parameters:
            require(self.lora_dropout == 0, "lora_dropout must be 0 with target_parameters (PEFT's ParamWrapper "
                    "cannot apply dropout to a raw parameter's input)", "pass --lora-dropout 0")
            require(not self.use_dora, "DoRA does not apply to target_parameters (PEFT's ParamWrapper refuses it)",
                    "drop --use-dora, or target nn.Linear modules only")
        require(self.lora_alpha > 0, f"lora_alpha={self.lora_alpha} must be positive", "pass --lora-alpha 16")
        for key, rank in parse_pattern(self.rank_pattern, "rank_pattern").items():
            require(rank == int(rank) and rank > 0, f"rank_pattern {key}={rank:g} is not a positive integer",
                    "pass e.g. --rank-pattern o_proj=16")
        for key, alpha in self.peft_alpha_pattern.items():
            require(alpha > 0, f"alpha_pattern {key}={alpha:g} must be positive", "pass e.g. --alpha-pattern o_proj=32")

    @classmethod
    def compare_variants(cls, model: Any) -> dict[str, dict[str, Any]]:
        """:attr:`COMPARE_VARIANTS`, plus ``<name>+experts`` (``target_parameters=experts``, PEFT's fold) and
        ``<name>+experts/routed`` on a model whose experts are fused raw parameters."""
        experts = {f"{cls.name}+experts": {"target_parameters": "experts"},
                   f"{cls.name}+experts/routed": {"target_parameters": "experts", "experts_path": "routed"}} \
            if model.has_fused_experts else {}
        return {**cls.COMPARE_VARIANTS, **experts}

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @functools.cached_property
    def peft_rank_pattern(self) -> dict[str, int]:
        """rank_pattern as PEFT's ``LoraConfig.rank_pattern`` dict (parsed once)."""
        return {k: int(v) for k, v in parse_pattern(self.rank_pattern, "rank_pattern").items()}

    @functools.cached_property
    def peft_alpha_pattern(self) -> dict[str, float]:
        """alpha_pattern as PEFT's ``LoraConfig.alpha_pattern`` dict (parsed once)."""
        return parse_pattern(self.alpha_pattern, "alpha_pattern")

    def rank_for(self, path: str) -> int:
        """The rank of the target at ``path`` (a module or raw parameter path): rank_pattern's, else r."""
        return int(_match(self.peft_rank_pattern, path, self.r))

    def alpha_for(self, path: str) -> float:
        """The lora_alpha of the target at ``path``: alpha_pattern's, else lora_alpha."""
        return _match(self.peft_alpha_pattern, path, self.lora_alpha)

    def routes(self, m: Any) -> bool:
        """Whether the adapted raw parameter ``m`` (a MatrixSpec) runs lorabench's routed path: a fused expert
        tensor (copies > 1) with ``experts_path="routed"``; the router, and everything under ``fold``, folds."""
        return self.experts_path == "routed" and m.copies > 1

    def scaling_for(self, path: str) -> float:
        """alpha / r of that target (alpha / sqrt(r) with rsLoRA), PEFT's per-target scaling."""
        r = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.use_rslora else r)


def parse_pattern(entries: str | tuple[str, ...] | None, what: str) -> dict[str, float]:
    """``("o_proj=16", ...)`` -> {"o_proj": 16.0}, in order.

    Raises:
        UserError: an entry that is not name=number.
    """
    out: dict[str, float] = {}
    for entry in (entries,) if isinstance(entries, str) else entries or ():
        key, sep, value = str(entry).partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise UserError(f"{what} entry {entry!r} is not name=number", f"pass e.g. --{what.replace('_', '-')} o_proj=16")
    return out


def _match(pattern: dict[str, Any], path: str, default: float) -> float:
    return next((v for k, v in pattern.items() if name_matches(path, k)), default)
