"""The fine-tuning methods. Each folder holds ``config.py`` (torch-free dataclass with PEFT's defaults),
``memory.py`` (its :class:`~lorabench.methods.protocols.Estimator`, torch-free), ``layer.py`` (runtime
modules + ``apply``, torch) and an ``__init__`` that registers one :class:`~lorabench.methods.registry.Method`.

This module is torch-free: importing it registers every method (the imports below, in display order) and
builds a config from CLI/Hydra knobs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from lorabench.errors import UserError
from lorabench.methods.base import MethodConfig, Pairing
from lorabench.methods.registry import Method, get, registered
from lorabench.methods.targets import normalize_targets

from lorabench.methods import full, lora, qlora, prefix, adapters, ia3  # noqa: E402,F401  (registration)

METHODS: dict[str, Method] = registered()
CONFIGS: dict[str, type[MethodConfig]] = {name: m.config for name, m in METHODS.items()}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
#: Every ratio the methods declare (:attr:`MethodConfig.PAIRINGS`), in registration order.
PAIRINGS: tuple[Pairing, ...] = tuple(p for cls in CONFIGS.values() for p in cls.PAIRINGS)


def knob_names(method: str) -> tuple[str, ...]:
    """The knobs (dataclass fields) a method accepts."""
    return tuple(f.name for f in dataclasses.fields(get(method).config))


def make_config(method: str, knobs: Mapping[str, Any] | None = None) -> MethodConfig:
    """Build a method config from knob values; ``None`` values mean 'use the default'.

    Raises:
        UserError: unknown method, or a knob the method does not have (e.g. ``--r`` with ``ia3``).
    """
    cls = get(method).config
    allowed = set(knob_names(method))
    values = {k: v for k, v in (knobs or {}).items() if v is not None}
    for key in values:
        if key not in allowed:
            owners = [m for m in METHOD_NAMES if key in knob_names(m)]
            hint = f"it belongs to {', '.join(owners)}" if owners else "see `lorabench plan --help`"
            raise UserError(f"knob {key!r} does not apply to method {method!r}", hint)
    for key in ("target_modules", "feedforward_modules", "target_parameters", "rank_pattern", "alpha_pattern"):
        if key in values:
            values[key] = normalize_targets(values[key])
    try:
        return cls(**values)
    except TypeError as err:
        raise UserError(f"bad knobs for {method}: {err}", "see `lorabench plan --help`") from None


__all__ = ["CONFIGS", "METHODS", "METHOD_NAMES", "Method", "MethodConfig", "PAIRINGS", "Pairing", "get", "knob_names", "make_config"]
