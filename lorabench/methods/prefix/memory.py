"""Prefix-tuning estimator terms (Li & Liang 2021, arXiv:2101.00190; PEFT's PrefixEncoder).

D = head_dim * num_key_value_heads (PEFT's token_dim for GQA models), L layers, V virtual tokens.
Without projection: V * 2 * L * D parameters. With projection: Embedding(V, D) + Linear(D, H) +
Linear(H, 2 L D) = V*D + (D*H + H) + (H*2LD + 2LD), H = encoder_hidden_size (default D).
Attention runs over V + T keys.
"""

from __future__ import annotations

from lorabench.methods.protocols import LayerCtx
from lorabench.methods.terms import no_adapted_weight as adapted_weight
from lorabench.methods.terms import no_quantized_params as quantized_params
from lorabench.methods.terms import adapter_dtype
from lorabench.methods.terms import base_linear as linear
from lorabench.methods.terms import frozen_storage
from lorabench.methods.terms import identity as after_sublayer
from lorabench.methods.prefix.config import PrefixConfig
from lorabench.specs import DTYPE_BYTES, ModelSpec, TrainSpec

__all__ = ["adapted_weight", "linear", "after_sublayer", "prefix_tokens", "trainable_params", "trainable_dtype", "storage",
           "token_dim", "largest_trainable_params"]

trains_base = False


def token_dim(model: ModelSpec) -> int:
    """PEFT's token_dim: head_dim * num_key_value_heads when the config has num_key_value_heads, else hidden."""
    if "num_key_value_heads" in model.hf_config:
        return model.head_dim * model.num_kv_heads
    return model.hidden_size


def trainable_params(model: ModelSpec, cfg: PrefixConfig) -> int:
    v, d, n = cfg.num_virtual_tokens, token_dim(model), model.num_layers
    if not cfg.prefix_projection:
        return v * 2 * n * d
    h = cfg.encoder_hidden_size or d
    return v * d + (d * h + h) + (h * 2 * n * d + 2 * n * d)


def largest_trainable_params(model: ModelSpec, cfg: PrefixConfig) -> int:
    """The prefix embedding (V x 2 L D), or with the projection its largest tensor."""
    v, d, n = cfg.num_virtual_tokens, token_dim(model), model.num_layers
    if not cfg.prefix_projection:
        return v * 2 * n * d
    h = cfg.encoder_hidden_size or d
    return max(v * d, d * h, h * 2 * n * d)

def trainable_dtype(cfg: PrefixConfig, train: TrainSpec) -> str:
    return adapter_dtype(cfg, train)


def storage(model: ModelSpec, cfg: PrefixConfig, train: TrainSpec) -> tuple[int, int]:
    return frozen_storage(model, train)


def prefix_tokens(cfg: PrefixConfig) -> int:
    return cfg.num_virtual_tokens


def persistent_gradient_bytes(ctx: LayerCtx) -> int:
    """Gradient of each layer's concatenated K and V: the cat's backward hands the prefix a *slice* of it,
    and the slice keeps the whole (b, kv_heads, V+T, head_dim) storage alive until the prefix encoder's
    backward runs at the very end (observed in the trace; the same holds for PEFT's past_key_values)."""
    m, t = ctx.model, ctx.train
    e = DTYPE_BYTES[t.compute_dtype]
    return int(2 * t.micro_batch_size * m.num_kv_heads * (t.seq_len + ctx.method.num_virtual_tokens) * m.head_dim * e)


def trainable_tensor_numels(model: ModelSpec, cfg: PrefixConfig) -> list[int]:
    """Element counts of each trainable tensor (ZeRO-1 partitions whole tensors): the prefix embedding,
    or the encoder's embedding, two weights and two biases."""
    v, d, n = cfg.num_virtual_tokens, token_dim(model), model.num_layers
    if not cfg.prefix_projection:
        return [v * 2 * n * d]
    h = cfg.encoder_hidden_size or d
    return [v * d, d * h, h, h * 2 * n * d, 2 * n * d]


def root_trainable_params(model: ModelSpec, cfg: PrefixConfig) -> int:
    """Every trainable parameter (the prefix or its encoder) sits outside the decoder layers."""
    return trainable_params(model, cfg)
