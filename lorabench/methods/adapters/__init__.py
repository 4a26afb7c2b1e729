"""Houlsby bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751)."""

from lorabench.methods.adapters.config import AdaptersConfig

__all__ = ["AdaptersConfig"]
