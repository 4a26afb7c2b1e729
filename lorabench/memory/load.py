"""The load phase: the peak while the model is built, loaded and quantized, before training starts (torch-free).

A quantized model reaches its training-time storage along one of two paths (``TrainSpec.loader``):

* ``per-layer``: each weight is quantized as it is loaded, so at most one matrix exists in 16 bit beside
  the 4-bit model (transformers' bitsandbytes quantizer, ``create_quantized_param`` per checkpoint tensor;
  lorabench's runtime quantizes each linear right after its init, ``methods/qlora/layer.py``);
* ``16bit-first``: the whole model is materialized in its 16-bit load dtype and then quantized matrix by
  matrix, so the peak is the full 16-bit model (plus the first matrix's 4-bit copy).

PEFT's ``prepare_model_for_kbit_training`` then casts every non-4-bit parameter to fp32 one at a time
(``param.data = param.data.to(torch.float32)``): the largest such parameter exists in both dtypes for a
moment. Models without quantized weights load straight into their training dtype. The verdict is the
maximum over all phases, the load phase included. Sources: docs/SOURCES.md#bnb-load,
docs/SOURCES.md#peft-kbit-steps.
"""

from __future__ import annotations

from typing import Any

from lorabench.specs import DTYPE_BYTES, ModelSpec, TrainSpec


def load_components(model: ModelSpec, method: Any, train: TrainSpec, hooks: Any, weights_bytes: int,
                    quantized_bytes: int, trainable_bytes: int) -> dict[str, int]:
    """Per-GPU bytes at the load phase's peak, as planner components (weights, quantized_weights, trainable).

    Args:
        weights_bytes, quantized_bytes, trainable_bytes: the training-time storage (unsharded).
    """
    quantized = hooks.quantized_params(model, method)
    if not quantized:
        return {"weights": weights_bytes, "quantized_weights": quantized_bytes, "trainable": trainable_bytes}
    load_b = DTYPE_BYTES[train.load_dtype]
    largest_quantized = max(m.weight_params for m in model.quantized_matrices())
    rest_params = model.total_params - quantized
    rest_load = int(rest_params * load_b)
    if train.loader == "16bit-first":
        # Every weight in 16 bit; the first matrix's 4-bit copy appears before its 16-bit original is freed.
        first_q = quantized_bytes // max(model.num_layers * len(model.quantized_matrices()), 1)
        loading = {"weights": int(model.total_params * load_b), "quantized_weights": first_q}
    else:
        loading = {"weights": rest_load + int(largest_quantized * load_b), "quantized_weights": quantized_bytes}
    if not train.prepare_kbit:
        return {**loading, "trainable": 0}
    largest_rest = max(model.vocab_size * model.hidden_size, model.hidden_size)
    casting = {"weights": weights_bytes + int(largest_rest * load_b), "quantized_weights": quantized_bytes}
    return max((loading, casting), key=lambda c: sum(c.values())) | {"trainable": 0}
