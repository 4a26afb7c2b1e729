"""Default estimator hooks shared by the method folders (torch-free).

A method's ``memory.py`` satisfies :class:`lorabench.methods.protocols.Estimator`; this module holds the
behaviour of a frozen base model that most methods share.
"""

from __future__ import annotations

from typing import Any

from lorabench.memory.autograd import Graph, Sym
from lorabench.methods.protocols import LayerCtx
from lorabench.specs import DTYPE_BYTES, MatrixSpec, ModelSpec, TrainSpec
from lorabench.steptime.work import Work


def frozen_storage(model: ModelSpec, train: TrainSpec) -> tuple[int, int]:
    """All base weights frozen in the parameter dtype, the norms in theirs:
    ((P - N) * bytes(param dtype) + N * bytes(norm dtype), 0 quantized), N the norm elements."""
    return int(model.total_params * DTYPE_BYTES[train.param_dtype]) + norm_extra_bytes(model, train), 0


def norm_extra_bytes(model: ModelSpec, train: TrainSpec) -> int:
    """N * (bytes(norm dtype) - bytes(param dtype)): the norms kept in another dtype (``TrainSpec.norm_dtype``;
    the QLoRA paper's fp32 norms: 2 h L + h elements on Llama)."""
    norms = model.params_by_kind()["norms"]
    return int(norms * (DTYPE_BYTES[train.norm_param_dtype] - DTYPE_BYTES[train.param_dtype]))


def base_linear(g: Graph, x: Sym, m: MatrixSpec, ctx: LayerCtx) -> Sym:
    """The unmodified projection (x cast to the weight dtype first, as a 16-bit model's inputs already are)."""
    x = g.to(x, ctx.param_dtype) if g.autocast is None else x
    return g.linear(x, m.out_features, m.in_features, ctx.param_dtype, ctx.train_base, m.bias and ctx.train_base)


def identity(g: Graph, x: Sym, ctx: LayerCtx, where: str) -> Sym:
    """No module after the sublayer (``where`` is "attention" or "mlp")."""
    return x


def no_adapted_weight(g: Graph, m: MatrixSpec, ctx: LayerCtx) -> Sym | None:
    """A raw parameter (router, fused experts) as the layer uses it: the frozen parameter itself (None)."""
    return None


def no_prefix(cfg: Any) -> int:
    return 0


def is_target(m: MatrixSpec, chosen: tuple[MatrixSpec, ...]) -> bool:
    return any(m.name == c.name for c in chosen)


def adapter_dtype(cfg: Any, train: TrainSpec) -> str:
    """The dtype adapter weights live in: ``cfg.adapter_dtype``, where ``base`` means the model's dtype."""
    return train.param_dtype if cfg.adapter_dtype == "base" else cfg.adapter_dtype


def no_persistent_gradients(ctx: LayerCtx) -> int:
    """Bytes of activation gradients a layer's backward leaves alive until the end of backward: none."""
    return 0


def no_quantized_params(model: ModelSpec, cfg: Any) -> int:
    """Elements of the base stored quantized: none."""
    return 0


def no_root_params(model: ModelSpec, cfg: Any) -> int:
    """Trainable parameters kept outside the decoder layers (FSDP's root unit; a trained base aside): none."""
    return 0


def even_tensor_numels(model: ModelSpec, cfg: Any) -> list[int] | None:
    """Element counts of the trainable tensors for ZeRO-1's partition: None, the method's many small tensors
    split evenly (the greedy partition balances them to within a few elements)."""
    return None


def no_extra_dequant(model: ModelSpec, cfg: Any, train: TrainSpec, device_kind: str = "gpu") -> Work:
    """Dequantization work a forward does beyond one per quantized weight: none."""
    return Work()


def no_fold_work(model: ModelSpec, cfg: Any, train: TrainSpec) -> tuple[Work, Work]:
    """(forward, backward) work on adapted raw parameters in the parameter dtype: none."""
    return Work(), Work()
