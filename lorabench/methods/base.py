"""What every method config shares (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar


@dataclass(frozen=True)
class MethodConfig:
    """Base class of the six method configs. ``name`` is the method's name everywhere (CLI, conf, records)."""

    name: ClassVar[str] = ""
    #: Keep adapter weights in fp32 even when the base model is 16-bit (PEFT's autocast_adapter_dtype=True).
    adapter_dtype: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out
