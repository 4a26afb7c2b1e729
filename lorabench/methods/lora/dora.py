"""DoRA (Liu et al. 2024, arXiv:2402.09353; docs/SOURCES.md#dora): weight-decomposed LoRA, with PEFT's semantics (peft 0.x
``tuners/lora/dora.py`` ``DoraLinearLayer`` and ``variants.DoraLinearVariant``), step by step because the
planner counts exactly these tensors.

The adapted weight is ``m * (W + s B A) / ||W + s B A||_c``: a trainable magnitude ``m`` per output feature
(initialised to the row norms of ``W + s B A``, i.e. of ``W`` since ``B = 0``), the norm taken over each
output row of the (out, in) weight and DETACHED (DoRA Sec. 4.3: treated as a constant, no gradient). In
forward, with ``x`` already cast to the adapter dtype::

    lora_weight = lora_B(lora_A(eye(in))).T          # (out, in), through the modules (PEFT, FSDP-safe)
    weight      = dequantize(W).to(x.dtype)          # the frozen weight; a copy unless dtypes match
    norm        = ||weight + s * lora_weight.detach()||_2 over dim 1, detached
    scale       = (m / norm).view(1, -1)
    base        = result - bias   (p = 0: the base layer's output)   |   F.linear(dropout(x), weight)  (p > 0)
    delta       = (scale - 1) * base + scale * lora_B(lora_A(x)) * s

and the layer returns ``(result + delta).to(result.dtype)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.methods.common import dequantize_module_weight


def base_weight(base: nn.Module) -> torch.Tensor:
    """The frozen weight as PEFT's ``dequantize_module_weight`` gives it: the dense parameter (GPT-2's
    ``Conv1D`` stores it (in, out)), or a 4-bit layer's weight dequantized to its original dtype."""
    return dequantize_module_weight(base)


def out_in(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


def weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row norms of ``weight + scaling * lora_weight`` (both (out, in)), in the sum's dtype."""
    weight = weight + scaling * lora_weight
    return torch.linalg.norm(weight, dim=1).to(weight.dtype)


def init_magnitude(layer: nn.Module) -> torch.Tensor:
    """PEFT's ``update_layer``: ``||W + s B A||`` per output row (B is zero at init, so ``||W||``)."""
    with torch.no_grad():
        lora_weight = layer.lora_B.weight @ layer.lora_A.weight
        weight = out_in(base_weight(layer.base_layer), layer.fan_in_fan_out)
        return weight_norm(weight.to(lora_weight.device), lora_weight, layer.scaling)


def dora_delta(layer: nn.Module, x: torch.Tensor, base_result: torch.Tensor | None) -> torch.Tensor:
    """What DoRA adds to the base result (``x`` in the adapter dtype; ``base_result`` None with dropout)."""
    lora_A, lora_B, scaling = layer.lora_A, layer.lora_B, layer.scaling
    x_eye = torch.eye(lora_A.weight.shape[1], device=lora_A.weight.device, dtype=lora_A.weight.dtype)
    lora_weight = lora_B(lora_A(x_eye)).T
    lora_weight = lora_weight.to(x.dtype)
    weight = base_weight(layer.base_layer).to(x.dtype)
    norm = weight_norm(out_in(weight, layer.fan_in_fan_out), lora_weight.detach(), scaling).detach()
    scale = (layer.lora_magnitude_vector / norm).view(1, -1)
    lora_result = lora_B(lora_A(x))
    if base_result is not None:
        bias = getattr(layer.base_layer, "bias", None)
        if bias is not None:
            base_result = base_result - bias
    else:
        base_result = F.linear(x, out_in(weight, layer.fan_in_fan_out))
    return (scale - 1) * base_result + scale * lora_result * scaling
