"""bitsandbytes comparison backend: the same frozen NF4 layer built by bitsandbytes itself.

bitsandbytes is imported lazily, inside the functions, so importing this module costs nothing and
works without it. Its CPU backend logs a warning about the optional ``kernels`` package on import;
that logger (``bitsandbytes.backends.cpu.ops``) is silenced here. Never install ``kernels``: it
downloads code from a hub at run time.

Two constructors:

- ``bnb_linear4bit_from_linear``: bitsandbytes quantizes the weight with its own kernels (what a
  QLoRA user gets). Packed codes and absmax equal lorabench's bit for bit; with double quantization
  a few absmax codes can differ by one step (see ``lorabench.quant.nf4``).
- ``bnb_linear4bit_from_lorabench``: loads a lorabench ``Linear4bit``'s state dict into a
  bitsandbytes layer (``Params4bit.from_prequantized``), so both hold identical quantized weights.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lorabench.quant.linear4bit import Linear4bit

_QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def import_bitsandbytes() -> ModuleType:
    """Import bitsandbytes with its ``kernels`` warning silenced.

    Raises:
        ImportError: If bitsandbytes is not installed (``pip install 'lorabench[reference]'``).
    """
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def _empty_bnb_layer(bnb: ModuleType, in_features: int, out_features: int, bias: bool,
                     double_quant: bool, compute_dtype: torch.dtype) -> Any:  # fmt: skip
    return bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                             compress_statistics=double_quant, quant_type="nf4", device="meta")  # fmt: skip


def _frozen_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


def bnb_linear4bit_from_linear(
    linear: nn.Linear, double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16
) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` (nf4, blocksize 64) quantized by bitsandbytes from ``linear``.

    Args:
        linear: Source layer; its weight dtype is the dtype bitsandbytes quantizes from.
        double_quant: bitsandbytes' ``compress_statistics``.
        compute_dtype: Dtype of the dequantized weight in the matmul.

    Returns:
        The bitsandbytes layer on ``linear``'s device, weight and bias frozen.
    """
    bnb = import_bitsandbytes()
    device = linear.weight.device
    layer = _empty_bnb_layer(bnb, linear.in_features, linear.out_features, linear.bias is not None,
                             double_quant, compute_dtype)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4",
                                     blocksize=64, module=layer)  # fmt: skip
    layer.bias = _frozen_bias(linear.bias)
    return layer.to(device)  # Params4bit quantizes on its first move to a device


def bnb_linear4bit_from_lorabench(layer: Linear4bit) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` holding exactly ``layer``'s quantized weight and bias.

    Goes through the bitsandbytes-format state dict, so it also checks that format's compatibility.
    """
    bnb = import_bitsandbytes()
    w = layer.weight
    device = w.device
    state = w.to_state_dict("weight")
    stats = {k: v for k, v in state.items() if k != "weight"}
    out = _empty_bnb_layer(bnb, layer.in_features, layer.out_features, layer.bias is not None,
                           w.double_quant, layer.compute_dtype)  # fmt: skip
    out.weight = bnb.nn.Params4bit.from_prequantized(
        data=state["weight"], quantized_stats=stats, requires_grad=False, device=device, module=out
    )
    out.bias = _frozen_bias(layer.bias)
    return out
