"""Efficiencies of the step-time model: conf/calibration/time-<device>.yaml if fitted, else time-default.yaml."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from lorabench.catalog import CONF_DIR, _load_yaml
from lorabench.steptime.work import OP_CLASSES

#: Op classes with their own efficiency ("recompute" is timed with the efficiencies of the classes it repeats).
EFFICIENCY_CLASSES: tuple[str, ...] = tuple(c for c in OP_CLASSES if c != "recompute")


@dataclass(frozen=True)
class TimeCalibration:
    """Per-class efficiency (fraction of peak FLOP/s or bandwidth reached) and the fixed cost per kernel."""

    efficiency: dict[str, float]
    kernel_overhead_s: float
    source: str = ""
    forward_op_overhead_s: float = 0.0
    """Extra cost of an op issued from a module's forward (Python module code) over one issued by autograd."""

    def to_yaml_doc(self) -> dict[str, Any]:
        return {"source": self.source, "efficiency": dict(self.efficiency), "kernel_overhead_s": self.kernel_overhead_s,
                "forward_op_overhead_s": self.forward_op_overhead_s}


def from_doc(doc: dict[str, Any]) -> TimeCalibration:
    eff = {c: float(doc["efficiency"][c]) for c in EFFICIENCY_CLASSES}
    return TimeCalibration(eff, float(doc["kernel_overhead_s"]), str(doc.get("source", "")),
                           float(doc.get("forward_op_overhead_s", 0.0)))


def is_fitted(device_name: str | None) -> bool:
    """Whether conf/calibration/time-<device>.yaml exists (a fit for that device)."""
    return device_name is not None and (CONF_DIR / "calibration" / f"time-{device_name}.yaml").is_file()


@functools.lru_cache(maxsize=None)
def load(device_name: str | None = None) -> TimeCalibration:
    """The fitted calibration of ``device_name`` when conf/calibration/time-<name>.yaml exists, else defaults."""
    path = CONF_DIR / "calibration" / f"time-{device_name}.yaml"
    if device_name is None or not path.is_file():
        path = CONF_DIR / "calibration" / "time-default.yaml"
    return from_doc(_load_yaml(path))
