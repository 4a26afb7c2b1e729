"""Prefix tuning's step-time terms (torch-free; Li & Liang 2021, arXiv:2101.00190).

The longer keys (s + V) are the attention op class's business (``prefix_tokens``). Here: per layer the
DynamicCache concatenation of the prefix in front of K and V (read b*kv*d*s + V rows, write b*kv*d*(s+V),
for K and V), the GQA ``repeat_kv`` copies the mask forces (write b*heads*d*(s+V) twice) and the additive mask
built per layer (b*s*(s+V) elements); backward slices the gradients back (about the same bytes); ~15 aten ops forward and 5 backward per layer. With
``prefix_projection`` the MLP D -> H -> 2LD runs once per step over the V virtual tokens.
"""

from __future__ import annotations

from lorabench.methods.terms import no_extra_dequant as extra_dequant_work  # noqa: F401
from lorabench.methods.terms import no_fold_work as fold_work  # noqa: F401
from lorabench.methods.prefix.config import PrefixConfig
from lorabench.methods.prefix.memory import token_dim
from lorabench.specs import DTYPE_BYTES, ModelSpec, TrainSpec
from lorabench.steptime.work import Work


def adapter_work(model: ModelSpec, cfg: PrefixConfig, train: TrainSpec) -> tuple[Work, Work]:
    b, s, v = train.micro_batch_size, train.seq_len, cfg.num_virtual_tokens
    e, d = DTYPE_BYTES[train.compute_dtype], model.head_dim
    kv = s + v
    cat = 2 * (b * model.num_kv_heads * d * (s + kv)) * e
    repeat = 2 * b * model.num_heads * d * kv * e * 2 if model.num_heads != model.num_kv_heads else 0
    mask = b * s * kv * e
    fwd = Work(0.0, cat + repeat + mask, 15) * model.num_layers
    if cfg.prefix_projection:
        dim = token_dim(model)
        hid = cfg.encoder_hidden_size or dim
        fwd = fwd + Work(2.0 * v * (dim * hid + hid * 2 * model.num_layers * dim), 0.0, 4)
    return fwd, Work(2 * fwd.flops, fwd.bytes, 5 * model.num_layers)


def dequant_work(model: ModelSpec, cfg: PrefixConfig, train: TrainSpec, device_kind: str = "gpu") -> Work:
    return Work()


def trainable_tensors(model: ModelSpec, cfg: PrefixConfig) -> int:
    """The prefix embedding, or embedding + two linears with biases."""
    return 5 if cfg.prefix_projection else 1
