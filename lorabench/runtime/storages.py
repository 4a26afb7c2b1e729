"""What the memory tracker reads off tensors and modules (torch only): quantized modules, bitsandbytes
quantization states, DTensor-local storages, the tensors inside an op's output, and the row it reports."""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import torch
from torch.utils._pytree import tree_flatten

QUANTIZED_CLASS_MARKERS: tuple[str, ...] = ("4bit",)
"""Substrings of a module's class name that mark its tensors as quantized (``Linear4bit``, ``Params4bit``)."""

def is_quantized_module(module: torch.nn.Module) -> bool:
    """A module whose tensors are quantized weights: ``is_quantized = True`` or a class name with ``4bit``."""
    if getattr(module, "is_quantized", False) is True:
        return True
    name = type(module).__name__.lower()
    return any(marker in name for marker in QUANTIZED_CLASS_MARKERS)


def quant_state_tensors(param: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a bitsandbytes ``Params4bit.quant_state`` and its nested ``state2`` (double quant)."""
    state, path = getattr(param, "quant_state", None), ""
    while state is not None:
        for name, value in vars(state).items():
            if isinstance(value, torch.Tensor):
                yield path + name, value
        state, path = getattr(state, "state2", None), path + "state2."


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a ``DTensor`` (FSDP2's sharded parameters, their gradients and optimizer
    states), whose storage holds this rank's bytes; any other tensor itself. A DTensor op runs its local op
    below this mode, so the mode sees the DTensor output and counts its local storage."""
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else tensor


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Plain (or DTensor-local) tensors inside an op's output (lists, tuples, dicts); sparse/storage-less
    ones skipped."""
    leaves, _ = tree_flatten(value)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided:
            yield local_tensor(leaf)


class StorageInfo(NamedTuple):
    """One tracked storage: the op that produced it (or the registered name), the shape and dtype of the
    first tensor seen on it, its bytes, category, the module running when it was made, and the phase."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    category: str
    module: str
    phase: str
