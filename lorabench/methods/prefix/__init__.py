"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190)."""

from lorabench.methods.prefix.config import PrefixConfig

__all__ = ["PrefixConfig"]
