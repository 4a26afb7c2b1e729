"""Full fine-tuning: every parameter trainable."""

from lorabench.methods.full.config import FullConfig

__all__ = ["FullConfig"]
