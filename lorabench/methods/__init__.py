"""The six fine-tuning methods. Each folder holds ``config.py`` (torch-free dataclass with PEFT's defaults),
``memory.py`` (its estimator terms, torch-free) and ``layer.py`` (runtime modules + ``apply``, torch).

This module is torch-free: it only registers configs and knows how to build one from CLI/Hydra knobs.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

from lorabench.errors import UserError, suggest
from lorabench.methods.adapters.config import AdaptersConfig
from lorabench.methods.base import MethodConfig
from lorabench.methods.full.config import FullConfig
from lorabench.methods.ia3.config import IA3Config
from lorabench.methods.lora.config import LoraConfig
from lorabench.methods.prefix.config import PrefixConfig
from lorabench.methods.qlora.config import QLoraConfig
from lorabench.methods.targets import normalize_targets

CONFIGS: dict[str, type[MethodConfig]] = {
    cls.name: cls for cls in (FullConfig, LoraConfig, QLoraConfig, PrefixConfig, AdaptersConfig, IA3Config)
}
METHOD_NAMES: tuple[str, ...] = tuple(CONFIGS)


def knob_names(method: str) -> tuple[str, ...]:
    """The knobs (dataclass fields) a method accepts."""
    return tuple(f.name for f in dataclasses.fields(CONFIGS[method]))


def make_config(method: str, knobs: Mapping[str, Any] | None = None) -> MethodConfig:
    """Build a method config from knob values; ``None`` values mean 'use the default'.

    Raises:
        UserError: unknown method, or a knob the method does not have (e.g. ``--r`` with ``ia3``).
    """
    if method not in CONFIGS:
        raise suggest(method, METHOD_NAMES, "method")
    cls = CONFIGS[method]
    allowed = set(knob_names(method))
    values = {k: v for k, v in (knobs or {}).items() if v is not None}
    for key in values:
        if key not in allowed:
            owners = [m for m in METHOD_NAMES if key in knob_names(m)]
            hint = f"it belongs to {', '.join(owners)}" if owners else "see `lorabench plan --help`"
            raise UserError(f"knob {key!r} does not apply to method {method!r}", hint)
    if "adapter_dtype" in values and values["adapter_dtype"] not in ("fp32", "bf16", "fp16", "base"):
        raise UserError(f"adapter_dtype {values['adapter_dtype']!r} is unknown", "use fp32 (default), bf16, fp16 or base")
    for key in ("target_modules", "feedforward_modules"):
        if key in values:
            values[key] = normalize_targets(values[key])
    try:
        return cls(**values)
    except TypeError as err:
        raise UserError(f"bad knobs for {method}: {err}", "see `lorabench plan --help`") from None


def memory_module(method: str) -> Any:
    """The method's torch-free estimator module (``lorabench.methods.<name>.memory``)."""
    return importlib.import_module(f"lorabench.methods.{method}.memory")


def layer_module(method: str) -> Any:
    """The method's runtime module (``lorabench.methods.<name>.layer``); imports torch."""
    return importlib.import_module(f"lorabench.methods.{method}.layer")
