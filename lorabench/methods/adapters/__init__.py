"""Houlsby bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751)."""

from __future__ import annotations

from lorabench.methods.adapters import memory, steptime
from lorabench.methods.adapters.config import AdaptersConfig
from lorabench.methods.protocols import MethodRuntime
from lorabench.methods.registry import Method, register


def load_runtime() -> MethodRuntime:
    """The runtime module (imports torch)."""
    from lorabench.methods.adapters import layer

    return layer


METHOD = register(Method(config=AdaptersConfig, estimator=memory, step_time=steptime, load_runtime=load_runtime,
                         sources_anchor="houlsby"))

__all__ = ["AdaptersConfig", "METHOD"]
