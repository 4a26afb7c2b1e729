"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190)."""

from __future__ import annotations

from lorabench.methods.prefix import memory, steptime
from lorabench.methods.prefix.config import PrefixConfig
from lorabench.methods.protocols import MethodRuntime
from lorabench.methods.registry import Method, register


def load_runtime() -> MethodRuntime:
    """The runtime module (imports torch)."""
    from lorabench.methods.prefix import layer

    return layer


METHOD = register(Method(config=PrefixConfig, estimator=memory, step_time=steptime, load_runtime=load_runtime,
                         sources_anchor="prefix"))

__all__ = ["PrefixConfig", "METHOD"]
