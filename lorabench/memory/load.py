"""The load phase: the peak while the model is built, loaded and quantized, before training starts (torch-free).

A quantized model reaches its training-time storage along one of two paths (``TrainSpec.loader``):

* ``per-layer``: each weight is quantized as it is loaded, so at most one matrix exists in 16 bit beside
  the 4-bit model (transformers' bitsandbytes quantizer, ``create_quantized_param`` per checkpoint tensor;
  lorabench's runtime quantizes each linear right after its init, ``methods/qlora/layer.py``);
* ``16bit-first``: the whole model is materialized in its 16-bit load dtype and then quantized matrix by
  matrix, so the peak is the full 16-bit model (plus the first matrix's 4-bit copy).

PEFT's ``prepare_model_for_kbit_training`` then casts every non-4-bit parameter to fp32 one at a time
(``param.data = param.data.to(torch.float32)``): the largest such parameter exists in both dtypes for a
moment. The load ends with the adapters added: the training-time storage (the largest moment when the
adapters outweigh the one 16-bit matrix of the per-layer path). Models without quantized weights load straight
into their training dtype. Checked against tracked real CPU builds (``tests/runtime/test_load_phase.py``). The verdict is the
maximum over all phases, the load phase included. Sources: docs/SOURCES.md#bnb-load,
docs/SOURCES.md#peft-kbit-steps.
"""

from __future__ import annotations

from typing import Any

from lorabench.quant.sizes import DEQUANT_CHUNK_ELEMS, NF4_BLOCKSIZE
from lorabench.specs import DTYPE_BYTES, ModelSpec, TrainSpec

QUANTIZE_SCRATCH_BYTES_PER_ELEM = 13
"""lorabench's chunked torch quantizer (``quant.nf4.quantize_nf4``), per element of a chunk, all live at its
peak: the fp32 copy (4), the scaled blocks (4), the int32 bucket indices (4) and the uint8 codes (1)."""


BNB_DOUBLE_QUANT_SCRATCH_BYTES_PER_BLOCK = 8
"""bitsandbytes' ``quantize_4bit(compress_statistics=True)``, per 64-element block, live while the absmax is
quantized again: the fp32 absmax the kernel wrote (4) and ``absmax - offset`` (4), both dropped once the uint8
absmax exists (docs/SOURCES.md#bnb-quantize-scratch)."""


def quantize_scratch_bytes(numel: int, method: Any, train: TrainSpec) -> int:
    """Temporaries of quantizing one ``numel``-element matrix, beyond its 4-bit result, by the quantizer that runs.

    * lorabench's own quantizer (``stack`` lorabench, ``backend`` lorabench) works in chunks of
      ``DEQUANT_CHUNK_ELEMS`` whole blocks: ``13 * min(numel, chunk)`` (measured with the storage tracker,
      docs/SOURCES.md#measured-load-phase);
    * bitsandbytes' ``quantize_4bit`` (the PEFT stack, transformers' bnb quantizer; or lorabench's bitsandbytes
      backend): its CUDA kernel writes the packed codes and the fp32 absmax directly, so only double
      quantization adds ``8 * ceil(numel / blocksize)`` (docs/SOURCES.md#bnb-quantize-scratch).
    """
    if train.stack == "peft" or getattr(method, "backend", "lorabench") == "bitsandbytes":
        blocks = -(-numel // getattr(method, "blocksize", NF4_BLOCKSIZE))
        return BNB_DOUBLE_QUANT_SCRATCH_BYTES_PER_BLOCK * blocks if getattr(method, "double_quant", True) else 0
    chunk = min(numel, DEQUANT_CHUNK_ELEMS // NF4_BLOCKSIZE * NF4_BLOCKSIZE)
    return QUANTIZE_SCRATCH_BYTES_PER_ELEM * chunk


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
    scratch = quantize_scratch_bytes(largest_quantized, method, train)
    if train.loader == "16bit-first":
        # Every weight in 16 bit; the first matrix's 4-bit copy appears before its 16-bit original is freed.
        first_q = quantized_bytes // max(model.num_layers * len(model.quantized_matrices()), 1)
        loading = {"weights": int(model.total_params * load_b) + scratch, "quantized_weights": first_q}
    else:
        loading = {"weights": rest_load + int(largest_quantized * load_b) + scratch,
                   "quantized_weights": quantized_bytes}
    # The load ends with the adapters added (get_peft_model / the method's apply): the training-time storage.
    loaded = {"weights": weights_bytes, "quantized_weights": quantized_bytes, "trainable": trainable_bytes}
    moments = [loading | {"trainable": 0}, loaded]
    if train.prepare_kbit:
        largest_rest = max(model.vocab_size * model.hidden_size, model.hidden_size)
        moments.append({"weights": weights_bytes + int(largest_rest * load_b), "quantized_weights": quantized_bytes,
                        "trainable": 0})
    return max(moments, key=lambda c: sum(c.values()))
