"""IA3 (Liu et al. 2022, arXiv:2205.05638)."""

from __future__ import annotations

from lorabench.methods.ia3 import memory, steptime
from lorabench.methods.ia3.config import IA3Config
from lorabench.methods.protocols import MethodRuntime
from lorabench.methods.registry import Method, register


def load_runtime() -> MethodRuntime:
    """The runtime module (imports torch)."""
    from lorabench.methods.ia3 import layer

    return layer


METHOD = register(Method(config=IA3Config, estimator=memory, step_time=steptime, load_runtime=load_runtime,
                         sources_anchor="ia3"))

__all__ = ["IA3Config", "METHOD"]
