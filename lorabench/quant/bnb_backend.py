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

Both turn off bitsandbytes' CPU inference repacking (:func:`keep_bitsandbytes_layout`), so every CPU runs
the same code path: the layers behave the same on an AMD EPYC with AVX512-BF16 as on any other x86 CPU.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorabench.errors import require
from lorabench.quant.sizes import NF4_BLOCKSIZE, bnb_cpu_row_problem

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


def require_cpu_safe_shape(in_features: int, device: torch.device, blocksize: int = NF4_BLOCKSIZE) -> None:
    """Refuse (UserError, one line) a bitsandbytes 4-bit layer on the CPU whose rows bitsandbytes' CPU kernels
    get wrong (:func:`lorabench.quant.sizes.bnb_cpu_row_problem`); on CUDA every shape is accepted."""
    problem = bnb_cpu_row_problem(in_features, blocksize) if device.type == "cpu" else None
    require(problem is None, str(problem), "use backend=lorabench (same NF4 format), or run on cuda")


def _empty_bnb_layer(bnb: ModuleType, in_features: int, out_features: int, bias: bool,
                     double_quant: bool, compute_dtype: torch.dtype) -> Any:  # fmt: skip
    return bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                             compress_statistics=double_quant, quant_type="nf4", device="meta")  # fmt: skip


def keep_bitsandbytes_layout(layer: Any) -> Any:
    """Turn off bitsandbytes' CPU inference repacking of ``layer`` (a ``bnb.nn.Linear4bit``); returns it.

    bitsandbytes 0.50 (``nn/modules.py``, ``Linear4bit.forward``) repacks the weight IN PLACE on the first
    eval-mode forward of an input without grad, when the CPU has AVX512-BF16
    (``Linear4bit.support_avx512bf16_for_cpu = functional.has_avx512bf16()``):
    ``functional._convert_weight_packed_for_cpu`` asserts ``out_features % 32 == 0`` ("N must be divisible
    by block_n"; tiny-llama's 176-wide MLP fails it) and changes ``weight.data`` to a tiled layout that only
    its ``gemv_4bit`` kernel reads. Left on, the result of the same code would depend on the CPU model: a
    crash for such shapes, a different kernel (and dequantize/merge/tracker reading a re-tiled buffer)
    otherwise. lorabench uses bitsandbytes for training comparisons, where bitsandbytes never repacks
    (training mode), so the flag is cleared: every CPU then runs bitsandbytes' dequantize + matmul path,
    the one training uses, for every shape. On CUDA the flag is never read (docs/SOURCES.md#bnb-cpu-kernels).
    """
    layer.support_avx512bf16_for_cpu = False
    return layer


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
    device = linear.weight.device
    require_cpu_safe_shape(linear.in_features, device)
    bnb = import_bitsandbytes()
    layer = _empty_bnb_layer(bnb, linear.in_features, linear.out_features, linear.bias is not None,
                             double_quant, compute_dtype)  # fmt: skip
    # No clone: Params4bit quantizes into new tensors and leaves ``linear``'s storage untouched (a clone would hold
    # a second 16-bit copy of the matrix while it is quantized: memory/load.py plans none).
    layer.weight = bnb.nn.Params4bit(linear.weight.detach(), requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4",
                                     blocksize=64, module=layer)  # fmt: skip
    layer.bias = _frozen_bias(linear.bias)
    return keep_bitsandbytes_layout(layer.to(device))  # Params4bit quantizes on its first move to a device


def bnb_linear4bit_from_lorabench(layer: Linear4bit) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` holding exactly ``layer``'s quantized weight and bias.

    Goes through the bitsandbytes-format state dict, so it also checks that format's compatibility.
    """
    w = layer.weight
    device = w.device
    require_cpu_safe_shape(layer.in_features, device, w.blocksize)
    bnb = import_bitsandbytes()
    state = w.to_state_dict("weight")
    stats = {k: v for k, v in state.items() if k != "weight"}
    out = _empty_bnb_layer(bnb, layer.in_features, layer.out_features, layer.bias is not None,
                           w.double_quant, layer.compute_dtype)  # fmt: skip
    out.weight = bnb.nn.Params4bit.from_prequantized(
        data=state["weight"], quantized_stats=stats, requires_grad=False, device=device, module=out
    )
    out.bias = _frozen_bias(layer.bias)
    return keep_bitsandbytes_layout(out)
