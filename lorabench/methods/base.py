"""What every method config shares (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping

from lorabench.errors import require

ADAPTER_DTYPES = ("fp32", "bf16", "fp16", "base")


@dataclass(frozen=True)
class Pairing:
    """A ratio ``compare`` and ``report`` print, declared by the method owning the left side: runs labelled
    ``left`` over runs labelled ``right`` (method names, or labels from :meth:`MethodConfig.label_for`)."""

    left: str
    right: str
    title: str
    same_targets: bool = False
    """compare evaluates ``right`` on ``left``'s ``target_modules`` (a quantized variant against its unquantized
    method on the same layers) instead of using ``right``'s default row."""
    in_compare: bool = True
    in_report: bool = True


@dataclass(frozen=True)
class MethodConfig:
    """Base class of the six method configs. ``name`` is the method's name everywhere (CLI, conf, records)."""

    name: ClassVar[str] = ""
    COMPARE_VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {}
    """Extra ``compare`` rows: label -> knobs over this method's defaults (LoRA: ``dora``)."""
    PAIRINGS: ClassVar[tuple[Pairing, ...]] = ()
    """Ratios against other methods (or backends) that ``compare`` and ``report`` print (:class:`Pairing`)."""
    labels: ClassVar[tuple[str, ...]] = ()
    """Report labels this method's runs can carry, in display order (default: the name alone)."""
    adapter_dtype: str = "fp32"
    """dtype of the trainable adapter weights: fp32 (PEFT's autocast_adapter_dtype=True), bf16, fp16, or base
    (the model's own dtype)."""

    def __post_init__(self) -> None:
        require(self.adapter_dtype in ADAPTER_DTYPES, f"adapter_dtype {self.adapter_dtype!r} is unknown",
                "use fp32 (default), bf16, fp16 or base")

    @classmethod
    def compare_variants(cls, model: Any) -> dict[str, dict[str, Any]]:
        """The extra ``compare`` rows for ``model`` (a ModelSpec): :attr:`COMPARE_VARIANTS` by default."""
        return dict(cls.COMPARE_VARIANTS)

    @classmethod
    def label_for(cls, knobs: Mapping[str, Any]) -> str:
        """The report label of a run with these (recorded) knobs: the method's name."""
        return cls.name

    @classmethod
    def all_labels(cls) -> tuple[str, ...]:
        return cls.labels or (cls.name,)

    def run_problem(self, model: Any, device: str) -> str | None:
        """Why this config cannot be run (measured) on ``device`` with ``model`` (a ModelSpec), None when it
        can; the runner refuses such a config before anything runs."""
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out
