"""Bottleneck-adapter runtime (Houlsby et al. 2019, arXiv:1902.00751; the adapters library's
``DoubleSeqBnConfig``/``SeqBnConfig`` placement).

Each adapter maps the sublayer output ``x`` (width h) to ``x + up(act(down(x)))`` with ``down = Linear(h, m)``
and ``up = Linear(m, h)`` (both with bias), ``m = hidden_size // reduction_factor`` and ``act`` = swish (SiLU):
``2*h*m + m + h`` parameters per adapter. Placement:

- ``double_seq_bn`` (Houlsby): after the attention output projection (``o_proj``/GPT-2 ``attn.c_proj``) and
  after the MLP (the decoder layer's ``mlp`` module, so MoE blocks work too), both before the residual add;
- ``seq_bn`` (Pfeiffer): after the MLP only.

Init: ``down`` ~ N(0, 0.02) with zero bias, ``up`` all zeros, so the model is exactly unchanged at init
(Houlsby's near-identity init). Weights are kept in the adapter dtype (fp32 by default); like LoRA the input is
cast to it and the result cast back: ``out = (x + up(act(down(x.to(fp32))))).to(x.dtype)``.
Llama-2-7B, defaults: 32 layers * 2 * (2*4096*256 + 256 + 4096) = 134,496,256 parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorabench.errors import require
from lorabench.methods.adapters.config import AdaptersConfig
from lorabench.methods.common import (UninitLinear, adapter_torch_dtype, freeze, layer_module_paths, module_device,
                                      replace_module)
from lorabench.specs import ModelSpec, TrainSpec

INIT_STD = 0.02
"""Standard deviation of the down projection's init (BERT-style, as the adapters library's 'bert' init)."""


class BottleneckAdapter(nn.Module):
    """``x + up(swish(down(x)))`` computed in the adapter dtype, returned in the input dtype."""

    def __init__(self, hidden_size: int, bottleneck: int, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.down = UninitLinear(hidden_size, bottleneck, bias=True, dtype=dtype, device=device)
        self.act = nn.SiLU()
        self.up = UninitLinear(bottleneck, hidden_size, bias=True, dtype=dtype, device=device)
        if torch.device(device).type != "meta":  # nothing to initialise on meta (tracing, counting)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """down ~ N(0, INIT_STD) with zero bias; up all zeros (the adapter starts as the identity)."""
        nn.init.normal_(self.down.weight, std=INIT_STD)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        x_a = x.to(dtype) if x.dtype != dtype else x
        return (x + self.up(self.act(self.down(x_a)))).to(x.dtype)


class WithAdapter(nn.Module):
    """A frozen sublayer followed by an adapter: ``adapter(base_layer(...))``."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.adapter(self.base_layer(*args, **kwargs))


def adapter_sites(spec: ModelSpec, cfg: AdaptersConfig) -> tuple[str, ...]:
    """Module paths inside one decoder layer that get an adapter after them."""
    attn_out = [m.name for m in spec.matrices if m.kind == "attention"][-1]  # o_proj / attn.c_proj
    return ("mlp",) if cfg.placement == "seq_bn" else (attn_out, "mlp")


def apply(model: nn.Module, spec: ModelSpec, cfg: AdaptersConfig, train: TrainSpec) -> nn.Module:
    """Freeze the model and insert bottleneck adapters (``cfg.placement``) in every decoder layer.

    Returns:
        ``model`` itself: base parameters frozen in ``train.param_dtype``; adapter weights and biases
        trainable in ``adapter_torch_dtype(cfg, train)`` (fp32 by default).
    """
    require(cfg.non_linearity in ("swish", "silu"),
            f"adapter non_linearity {cfg.non_linearity!r} is not supported", "use swish")
    bottleneck = spec.hidden_size // cfg.reduction_factor
    require(bottleneck >= 1, f"reduction_factor {cfg.reduction_factor} leaves no bottleneck for hidden size "
            f"{spec.hidden_size}", "pass a smaller --reduction-factor")
    freeze(model)
    dtype = adapter_torch_dtype(cfg, train)
    for layer_path, _ in layer_module_paths(model):
        for site in adapter_sites(spec, cfg):
            path = f"{layer_path}.{site}"
            base = model.get_submodule(path)
            adapter = BottleneckAdapter(spec.hidden_size, bottleneck, dtype=dtype, device=module_device(base))
            replace_module(model, path, WithAdapter(base, adapter))
    return model
