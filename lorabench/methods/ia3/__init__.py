"""IA3 (Liu et al. 2022, arXiv:2205.05638)."""

from lorabench.methods.ia3.config import IA3Config

__all__ = ["IA3Config"]
