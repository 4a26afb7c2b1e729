"""QLoRA (Dettmers et al. 2023, arXiv:2305.14314): NF4 base weights + LoRA."""

from lorabench.methods.qlora.config import QLoraConfig

__all__ = ["QLoraConfig"]
