"""IA3 estimator terms (Liu et al. 2022, arXiv:2205.05638, Sec. 3.3; PEFT's IA3 Linear).

Trainable = L * (sum of out_features over non-feed-forward targets + in_features over feed-forward ones).
Feed-forward targets scale their input (x * l, saving x in the vector's dtype); others scale their output.
"""

from __future__ import annotations

from lorabench.methods.terms import no_adapted_weight as adapted_weight
from lorabench.memory.autograd import Graph, Sym
from lorabench.methods.protocols import LayerCtx
from lorabench.methods.terms import even_tensor_numels as trainable_tensor_numels
from lorabench.methods.terms import no_root_params as root_trainable_params
from lorabench.methods.terms import no_quantized_params as quantized_params
from lorabench.methods.terms import no_persistent_gradients as persistent_gradient_bytes
from lorabench.methods.terms import adapter_dtype
from lorabench.methods.terms import base_linear, frozen_storage, is_target
from lorabench.methods.terms import identity as after_sublayer
from lorabench.methods.terms import no_prefix as prefix_tokens
from lorabench.methods.ia3.config import IA3Config
from lorabench.methods.targets import name_matches, select
from lorabench.specs import MatrixSpec, ModelSpec, TrainSpec

__all__ = ["adapted_weight", "after_sublayer", "prefix_tokens", "trainable_params", "trainable_dtype", "storage", "linear",
           "targets", "is_feedforward", "largest_trainable_params",
           "root_trainable_params", "trainable_tensor_numels"]

trains_base = False


def targets(model: ModelSpec, cfg: IA3Config) -> tuple[MatrixSpec, ...]:
    return select(model, cfg.target_modules, model.traits.ia3_default_targets, cfg.name)


def is_feedforward(model: ModelSpec, cfg: IA3Config, m: MatrixSpec) -> bool:
    ff = cfg.feedforward_modules
    if ff is None:
        ff = model.traits.ia3_default_feedforward
    if ff == "all-linear":
        return True
    return any(name_matches(m.name, t) for t in ff)


def trainable_params(model: ModelSpec, cfg: IA3Config) -> int:
    per_layer = sum(m.in_features if is_feedforward(model, cfg, m) else m.out_features for m in targets(model, cfg))
    return model.num_layers * per_layer


def largest_trainable_params(model: ModelSpec, cfg: IA3Config) -> int:
    """The largest scaling vector."""
    return max(m.in_features if is_feedforward(model, cfg, m) else m.out_features for m in targets(model, cfg))

def trainable_dtype(cfg: IA3Config, train: TrainSpec) -> str:
    return adapter_dtype(cfg, train)


def storage(model: ModelSpec, cfg: IA3Config, train: TrainSpec) -> tuple[int, int]:
    return frozen_storage(model, train)


def linear(g: Graph, x: Sym, m: MatrixSpec, ctx: LayerCtx) -> Sym:
    cfg: IA3Config = ctx.method
    if not is_target(m, targets(ctx.model, cfg)):
        return base_linear(g, x, m, ctx)
    if is_feedforward(ctx.model, cfg, m):
        # (x.to(l.dtype) * l).to(x.dtype): the mul saves the cast input.
        vec = g.param(m.in_features, adapter_dtype(cfg, ctx.train), True)
        scaled = g.to(g.mul(g.to(x, adapter_dtype(cfg, ctx.train)), vec), x.dtype)
        return base_linear(g, scaled, m, ctx)
    # (result * l).to(result.dtype): type promotion inside mul; autograd saves the 16-bit result itself.
    out = base_linear(g, x, m, ctx)
    vec = g.param(m.out_features, adapter_dtype(cfg, ctx.train), True)
    return g.to(g.mul(out, vec), out.dtype)
