"""QLoRA (Dettmers et al. 2023, arXiv:2305.14314): NF4 base weights + LoRA."""

from __future__ import annotations

from lorabench.methods.qlora import memory, steptime
from lorabench.methods.qlora.config import QLoraConfig
from lorabench.methods.protocols import MethodRuntime
from lorabench.methods.registry import Method, register


def load_runtime() -> MethodRuntime:
    """The runtime module (imports torch)."""
    from lorabench.methods.qlora import layer

    return layer


METHOD = register(Method(config=QLoraConfig, estimator=memory, step_time=steptime, load_runtime=load_runtime,
                         sources_anchor="qlora"))

__all__ = ["QLoraConfig", "METHOD"]
