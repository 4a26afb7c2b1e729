"""Which weight matrices a method targets, with PEFT's matching rules and per-architecture defaults.

PEFT matches a ``target_modules`` entry against a module's full name: equal, or the name ends with
``"." + entry``. ``"all-linear"`` means every ``nn.Linear``/``Conv1D`` except the output head.
The per-architecture defaults are traits of the model (``ModelSpec.traits.*_default_targets``, set by
:mod:`lorabench.architectures` from peft.utils.constants).
"""

from __future__ import annotations

from typing import Sequence

from lorabench.errors import UserError
from lorabench.specs import MatrixSpec, ModelSpec

def name_matches(module_name: str, target: str) -> bool:
    """PEFT's suffix rule: ``module_name == target`` or it ends with ``'.' + target``."""
    return module_name == target or module_name.endswith("." + target)


def normalize_targets(targets: str | Sequence[str] | None) -> str | tuple[str, ...] | None:
    """Accept ``"all-linear"``, a comma-separated string, a list, or None (architecture default)."""
    if targets is None or targets == "all-linear":
        return targets
    if isinstance(targets, str):
        targets = [t for t in (s.strip() for s in targets.split(",")) if t]
    return tuple(str(t) for t in targets)


def select(model: ModelSpec, targets: str | tuple[str, ...] | None, default: tuple[str, ...],
           method: str) -> tuple[MatrixSpec, ...]:
    """The matrices of one decoder layer a method wraps (only ``nn.Linear``-like modules); ``targets`` None
    means ``default`` (the architecture's trait).

    Raises:
        UserError: the targets match nothing.
    """
    linears = model.linear_matrices()
    if targets == "all-linear":
        return linears
    if targets is None:
        targets = default
    chosen = tuple(m for m in linears if any(name_matches(m.name, t) for t in targets))
    if not chosen:
        names = ", ".join(m.name for m in linears)
        raise UserError(f"{method} target_modules {list(targets)} match no module of {model.name}",
                        f"choose among: {names}")
    return chosen
