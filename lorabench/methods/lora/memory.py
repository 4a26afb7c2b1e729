"""LoRA estimator terms (Hu et al. 2021, arXiv:2106.09685).

Trainable = L * sum over targeted linears of r * (in + out). The forward mirrors PEFT's LoRA Linear:
the frozen base saves nothing of its input; the adapter path casts the (dropped-out) input to the adapter
dtype (an fp32 copy, saved by lora_A) and lora_B saves A's r-wide output.
"""

from __future__ import annotations

from lorabench.errors import require
from lorabench.memory.autograd import Graph, Sym
from lorabench.methods.protocols import LayerCtx
from lorabench.methods.terms import even_tensor_numels as trainable_tensor_numels
from lorabench.methods.terms import no_root_params as root_trainable_params
from lorabench.methods.terms import no_quantized_params as quantized_params
from lorabench.methods.terms import no_persistent_gradients as persistent_gradient_bytes
from lorabench.methods.terms import adapter_dtype, base_linear, frozen_storage, is_target
from lorabench.methods.terms import identity as after_sublayer
from lorabench.methods.terms import no_prefix as prefix_tokens
from lorabench.methods.lora.config import LoraConfig
from lorabench.methods.lora.dora_memory import dora_path, magnitude_params
from lorabench.methods.lora.experts_memory import adapted_weight, largest_raw_adapter_params, raw_adapter_params
from lorabench.methods.targets import select
from lorabench.specs import MatrixSpec, ModelSpec, TrainSpec

__all__ = ["adapted_weight", "after_sublayer", "prefix_tokens", "linear", "trainable_params", "trainable_dtype", "storage",
           "targets", "adapter_path", "check", "largest_trainable_params",
           "root_trainable_params", "trainable_tensor_numels"]

trains_base = False


def targets(model: ModelSpec, cfg: LoraConfig) -> tuple[MatrixSpec, ...]:
    return select(model, cfg.target_modules, model.traits.lora_default_targets, cfg.name)


def check(model: ModelSpec, cfg: LoraConfig) -> None:
    """Refuse a rank above min(in, out) of a targeted matrix: B A then has more parameters than the full
    update it factors, and no more expressiveness (rank B A <= min(in, out))."""
    for m in targets(model, cfg):
        limit, r = min(m.in_features, m.out_features), cfg.rank_for(m.name)
        require(r <= limit, f"lora rank r={r} exceeds min(in, out)={limit} of {m.name}",
                f"pass --r {limit} or less (or a smaller --rank-pattern entry)")


def trainable_params(model: ModelSpec, cfg: LoraConfig) -> int:
    """L * sum r * (in + out) over targeted linears (A: r x in, B: out x r), + L * sum out with DoRA
    (one magnitude per output feature), + the raw parameters' adapters (``target_parameters``)."""
    chosen = targets(model, cfg)
    dora = magnitude_params(chosen) if cfg.use_dora else 0
    linears = model.num_layers * (sum(cfg.rank_for(m.name) * (m.in_features + m.out_features) for m in chosen) + dora)
    return linears + raw_adapter_params(model, cfg)


def largest_trainable_params(model: ModelSpec, cfg: LoraConfig) -> int:
    """The largest adapter tensor: A (r x in) or B (out x r) of a targeted matrix or raw parameter."""
    linears = max(cfg.rank_for(m.name) * max(m.in_features, m.out_features) for m in targets(model, cfg))
    return max(linears, largest_raw_adapter_params(model, cfg))


def trainable_dtype(cfg: LoraConfig, train: TrainSpec) -> str:
    return adapter_dtype(cfg, train)


def storage(model: ModelSpec, cfg: LoraConfig, train: TrainSpec) -> tuple[int, int]:
    return frozen_storage(model, train)


def adapter_path(g: Graph, x: Sym, base_out: Sym, m: MatrixSpec, cfg: LoraConfig, dtype: str,
                 weight_dtype: str = "", dequant_scratch_bytes: int | None = None) -> Sym:
    """result + lora_B(lora_A(dropout(x.to(adapter dtype)))) * scaling, cast back to the result dtype
    (PEFT's order: cast, then dropout); DoRA's path (:mod:`lorabench.methods.lora.dora_memory`) with use_dora."""
    if cfg.use_dora:
        return dora_path(g, x, base_out, m, cfg, dtype, weight_dtype or dtype, dequant_scratch_bytes)
    g.hold(base_out)  # `result` stays in a variable while the adapter path runs
    xa = g.dropout(g.to(x, dtype), cfg.lora_dropout)
    r = cfg.rank_for(m.name)
    a = g.linear(xa, r, m.in_features, dtype, True)
    b = g.linear(a, m.out_features, r, dtype, True)
    out = g.add(base_out, g.scale(b))
    g.drop(base_out)
    return g.to(out, base_out.dtype)


def linear(g: Graph, x: Sym, m: MatrixSpec, ctx: LayerCtx) -> Sym:
    out = base_linear(g, x, m, ctx)
    if is_target(m, targets(ctx.model, ctx.method)):
        out = adapter_path(g, x, out, m, ctx.method, adapter_dtype(ctx.method, ctx.train), ctx.param_dtype)
    return out
