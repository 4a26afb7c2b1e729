"""LoRA (Hu et al. 2021, arXiv:2106.09685)."""

from __future__ import annotations

from lorabench.methods.lora import memory, steptime
from lorabench.methods.lora.config import LoraConfig
from lorabench.methods.protocols import MethodRuntime
from lorabench.methods.registry import Method, register


def load_runtime() -> MethodRuntime:
    """The runtime module (imports torch)."""
    from lorabench.methods.lora import layer

    return layer


METHOD = register(Method(config=LoraConfig, estimator=memory, step_time=steptime, load_runtime=load_runtime,
                         sources_anchor="lora"))

__all__ = ["LoraConfig", "METHOD"]
