"""Full fine-tuning: every parameter trainable."""

from __future__ import annotations

from lorabench.methods.full import memory, steptime
from lorabench.methods.full.config import FullConfig
from lorabench.methods.protocols import MethodRuntime
from lorabench.methods.registry import Method, register


def load_runtime() -> MethodRuntime:
    """The runtime module (imports torch)."""
    from lorabench.methods.full import layer

    return layer


METHOD = register(Method(config=FullConfig, estimator=memory, step_time=steptime, load_runtime=load_runtime,
                         default_precision="bf16-mixed"))

__all__ = ["FullConfig", "METHOD"]
