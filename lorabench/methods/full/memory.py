"""Full fine-tuning estimator terms: every weight is trainable in the parameter dtype."""

from __future__ import annotations

from lorabench.methods.terms import no_adapted_weight as adapted_weight
from lorabench.methods.terms import even_tensor_numels as trainable_tensor_numels
from lorabench.methods.terms import no_root_params as root_trainable_params
from lorabench.methods.terms import no_quantized_params as quantized_params
from lorabench.methods.terms import no_persistent_gradients as persistent_gradient_bytes
from lorabench.methods.terms import base_linear as linear
from lorabench.methods.terms import identity as after_sublayer
from lorabench.methods.terms import no_prefix as prefix_tokens
from lorabench.methods.full.config import FullConfig
from lorabench.specs import ModelSpec, TrainSpec

__all__ = ["adapted_weight", "linear", "after_sublayer", "prefix_tokens", "trainable_params", "trainable_dtype", "storage",
           "largest_trainable_params",
           "root_trainable_params", "trainable_tensor_numels"]

trains_base = True


def trainable_params(model: ModelSpec, cfg: FullConfig) -> int:
    """P, every parameter (tied embeddings once)."""
    return model.total_params


def largest_trainable_params(model: ModelSpec, cfg: FullConfig) -> int:
    """The largest parameter tensor: the V x h embedding (or lm_head) or the largest layer matrix."""
    return max([model.vocab_size * model.hidden_size] + [m.weight_params for m in model.matrices])

def trainable_dtype(cfg: FullConfig, train: TrainSpec) -> str:
    return train.param_dtype


def storage(model: ModelSpec, cfg: FullConfig, train: TrainSpec) -> tuple[int, int]:
    """No frozen weights: they are all counted as trainable."""
    return 0, 0
