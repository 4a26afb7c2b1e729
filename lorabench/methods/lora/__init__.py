"""LoRA (Hu et al. 2021, arXiv:2106.09685)."""

from lorabench.methods.lora.config import LoraConfig

__all__ = ["LoraConfig"]
