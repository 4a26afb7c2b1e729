"""Houlsby bottleneck-adapter estimator terms (Houlsby et al. 2019, arXiv:1902.00751, Sec. 2.1).

m = hidden // reduction_factor; each adapter has 2*h*m + m + h parameters (down and up projections with
biases); double_seq_bn places two per layer. Forward: x + up(swish(down(x.to(adapter dtype)))).
"""

from __future__ import annotations

from lorabench.errors import require
from lorabench.methods.terms import no_adapted_weight as adapted_weight
from lorabench.memory.autograd import Graph, Sym
from lorabench.methods.protocols import LayerCtx
from lorabench.methods.terms import even_tensor_numels as trainable_tensor_numels
from lorabench.methods.terms import no_root_params as root_trainable_params
from lorabench.methods.terms import no_quantized_params as quantized_params
from lorabench.methods.terms import no_persistent_gradients as persistent_gradient_bytes
from lorabench.methods.terms import adapter_dtype
from lorabench.methods.terms import base_linear as linear
from lorabench.methods.terms import frozen_storage
from lorabench.methods.terms import no_prefix as prefix_tokens
from lorabench.methods.adapters.config import AdaptersConfig
from lorabench.specs import ModelSpec, TrainSpec

__all__ = ["adapted_weight", "linear", "prefix_tokens", "trainable_params", "trainable_dtype", "storage", "after_sublayer",
           "bottleneck", "check", "largest_trainable_params",
           "root_trainable_params", "trainable_tensor_numels"]

trains_base = False


def bottleneck(model: ModelSpec, cfg: AdaptersConfig) -> int:
    return model.hidden_size // cfg.reduction_factor


def check(model: ModelSpec, cfg: AdaptersConfig) -> None:
    """The bottleneck m = hidden // reduction_factor must be at least 1."""
    h = model.hidden_size
    require(cfg.reduction_factor <= h, f"reduction_factor={cfg.reduction_factor} exceeds {model.name}'s hidden size {h} "
            "(bottleneck hidden // factor would be 0)", f"pass --reduction-factor {h} or less (16 is the default)")


def trainable_params(model: ModelSpec, cfg: AdaptersConfig) -> int:
    h, m = model.hidden_size, bottleneck(model, cfg)
    return model.num_layers * cfg.adapters_per_layer * (2 * h * m + m + h)


def largest_trainable_params(model: ModelSpec, cfg: AdaptersConfig) -> int:
    """The down (m x h) or up (h x m) projection of one adapter."""
    return model.hidden_size * bottleneck(model, cfg)

def trainable_dtype(cfg: AdaptersConfig, train: TrainSpec) -> str:
    return adapter_dtype(cfg, train)


def storage(model: ModelSpec, cfg: AdaptersConfig, train: TrainSpec) -> tuple[int, int]:
    return frozen_storage(model, train)


def after_sublayer(g: Graph, x: Sym, ctx: LayerCtx, where: str) -> Sym:
    """Placed after the attention output (double_seq_bn only) and after the MLP output."""
    cfg: AdaptersConfig = ctx.method
    if where == "attention" and cfg.placement != "double_seq_bn":
        return x
    h, m = ctx.model.hidden_size, bottleneck(ctx.model, cfg)
    xa = g.to(x, adapter_dtype(cfg, ctx.train))
    down = g.linear(xa, m, h, adapter_dtype(cfg, ctx.train), True, True)
    up = g.linear(g.unary_save_input(down), h, m, adapter_dtype(cfg, ctx.train), True, True)
    return g.to(g.add(xa, up), x.dtype)
