"""QLoRA estimator terms (Dettmers et al. 2023, arXiv:2305.14314).

Quantizable layer matrices are stored in NF4 (exact bytes from :mod:`lorabench.quant.sizes`, with or
without double quantization); embeddings, norms, biases and lm_head stay in the parameter dtype. The
4-bit linear re-dequantizes its weight in backward and saves no activation; LoRA on top as in LoRA.
"""

from __future__ import annotations

from lorabench.memory.autograd import Graph, Sym, dequant_scratch_bytes
from lorabench.methods.protocols import LayerCtx
from lorabench.methods.terms import even_tensor_numels as trainable_tensor_numels
from lorabench.methods.terms import no_root_params as root_trainable_params
from lorabench.methods.terms import no_persistent_gradients as persistent_gradient_bytes
from lorabench.methods.terms import identity as after_sublayer
from lorabench.methods.terms import adapter_dtype, is_target, norm_extra_bytes
from lorabench.methods.terms import no_prefix as prefix_tokens
from lorabench.methods.lora.memory import adapted_weight, adapter_path, check, largest_trainable_params, targets, trainable_dtype, trainable_params
from lorabench.methods.qlora.config import QLoraConfig
from lorabench.quant.sizes import nf4_storage_bytes
from lorabench.specs import DTYPE_BYTES, MatrixSpec, ModelSpec, TrainSpec

__all__ = ["adapted_weight", "after_sublayer", "prefix_tokens", "trainable_params", "trainable_dtype", "storage", "linear",
           "quantized_params", "check", "largest_trainable_params",
           "root_trainable_params", "trainable_tensor_numels"]

trains_base = False


def quantized_params(model: ModelSpec, cfg: QLoraConfig | None = None) -> int:
    """Elements stored in NF4: every quantizable layer matrix (weights only) in every layer."""
    return model.num_layers * sum(m.weight_params for m in model.quantized_matrices())


def storage(model: ModelSpec, cfg: QLoraConfig, train: TrainSpec) -> tuple[int, int]:
    """(16-bit remainder, NF4 bytes): each matrix is quantized on its own, so sizes add per matrix."""
    mats = model.quantized_matrices()
    quant = model.num_layers * sum(
        m.copies * nf4_storage_bytes(m.in_features * m.out_features, cfg.blocksize, cfg.double_quant) for m in mats)
    # The 4-bit layer keeps its bias in the compute dtype; every other frozen tensor keeps the param dtype.
    biases = model.num_layers * sum(m.bias_params for m in mats if m.is_linear)
    rest = (model.total_params - quantized_params(model) - biases) * DTYPE_BYTES[train.param_dtype]
    return int(rest + biases * DTYPE_BYTES[cfg.compute_dtype]) + norm_extra_bytes(model, train), int(quant)


def torch_dequant(cfg: QLoraConfig) -> bool:
    """Whether the 4-bit layers dequantize with pure-torch ops (scratch) rather than the Triton kernel (none).

    ``auto`` is planned as a CUDA run takes it (triton); a CPU run with ``auto`` uses torch (plan it with
    ``dequant=torch``). The bitsandbytes backend keeps the torch-path term.
    """
    return cfg.backend == "bitsandbytes" or cfg.dequant == "torch"


def linear(g: Graph, x: Sym, m: MatrixSpec, ctx: LayerCtx) -> Sym:
    cfg: QLoraConfig = ctx.method
    if m.quantizable:
        out = g.frozen_linear_no_save(x, m.out_features, m.in_features, x.dtype if g.autocast is None else g.autocast,
                                      torch_dequant=torch_dequant(cfg))
        # Linear4bit returns its input's dtype (bitsandbytes' ``out.to(inp_dtype)``; lorabench's layer too):
        # an fp32 input (fp32 norms before it) gives an fp32 output under autocast.
        out = g.to(out, x.dtype)
    else:
        out = g.linear(x, m.out_features, m.in_features, ctx.param_dtype, False)
    if is_target(m, targets(ctx.model, cfg)):
        scratch = None
        if m.quantizable:  # DoRA dequantizes the weight again for its norm
            scratch = dequant_scratch_bytes(m.in_features * m.out_features) if torch_dequant(cfg) else 0
        out = adapter_path(g, x, out, m, cfg, adapter_dtype(cfg, ctx.train), ctx.param_dtype, scratch)
    return out
