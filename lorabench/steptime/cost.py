"""Time to train and cost from a predicted step (torch-free).

train_time_s = tokens / tokens_per_s (all GPUs); cost_usd = train_time_s / 3600 * usd_per_gpu_hour * num_gpus,
with the GPU's dated on-demand catalog price unless the user gives one (docs/SOURCES.md#price-runpod-2026-03).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.errors import require
from lorabench.specs import GpuSpec
from lorabench.steptime.model import StepTime


@dataclass(frozen=True)
class BudgetFlags:
    """The time-and-cost flags of plan/compare/advise (one flag per field, :mod:`lorabench.knobs`)."""

    tokens: float | None = None
    """tokens to train on (adds the time to train and its cost)"""
    dataset_tokens: float | None = None
    """tokens in the dataset (with --epochs; instead of --tokens)"""
    epochs: float | None = None
    """passes over --dataset-tokens (default 1)"""
    usd_per_hour: float | None = None
    """price of one GPU-hour (default: the GPU's dated on-demand catalog price, `lorabench gpus`)"""


@dataclass(frozen=True)
class TrainingBudget:
    """What the user wants to train: total tokens (dataset tokens x epochs) and an optional price override."""

    tokens: float | None = None
    usd_per_gpu_hour: float | None = None

    @classmethod
    def from_flags(cls, tokens: float | None, dataset_tokens: float | None, epochs: float | None,
                   usd_per_hour: float | None) -> "TrainingBudget":
        """Validate ``--tokens`` / ``--dataset-tokens --epochs`` / ``--usd-per-hour``."""
        require(tokens is None or dataset_tokens is None, "--tokens and --dataset-tokens both given",
                "pass --tokens N, or --dataset-tokens N with --epochs E")
        require(epochs is None or dataset_tokens is not None, "--epochs needs --dataset-tokens",
                "pass --dataset-tokens N --epochs E (or --tokens N)")
        for flag, value in (("--tokens", tokens), ("--dataset-tokens", dataset_tokens), ("--epochs", epochs)):
            require(value is None or value > 0, f"{flag} {value:g} must be positive" if value is not None else "",
                    f"pass {flag} 1e9 for example")
        require(usd_per_hour is None or usd_per_hour >= 0, f"--usd-per-hour {usd_per_hour} must be >= 0",
                "pass the price of one GPU-hour, e.g. --usd-per-hour 2.5")
        total = tokens if tokens is not None else (dataset_tokens * (epochs or 1.0) if dataset_tokens else None)
        return cls(total, usd_per_hour)

    def price(self, gpu: GpuSpec) -> float | None:
        """USD per GPU-hour: the override, else the catalog's price (None when the catalog has none)."""
        if self.usd_per_gpu_hour is not None:
            return self.usd_per_gpu_hour
        return gpu.usd_per_hour or None


def train_time_s(step: StepTime, tokens: float) -> float:
    return tokens / step.tokens_per_s


def cost_usd(seconds: float, usd_per_gpu_hour: float, num_gpus: int) -> float:
    return seconds / 3600.0 * usd_per_gpu_hour * num_gpus


def summary(step: StepTime, budget: TrainingBudget, gpu: GpuSpec) -> dict[str, float | None]:
    """The JSON fields: step_time_s, tokens_per_s, mfu, and with tokens train_time_s and cost_usd."""
    out: dict[str, float | None] = {"step_time_s": step.step_time_s, "tokens_per_s": step.tokens_per_s,
                                    "mfu": step.mfu}
    if budget.tokens is not None:
        seconds = train_time_s(step, budget.tokens)
        price = budget.price(gpu)
        out.update({"tokens": budget.tokens, "train_time_s": seconds,
                    "usd_per_gpu_hour": price, "cost_usd": cost_usd(seconds, price, step.gpus) if price is not None else None})
    return out
