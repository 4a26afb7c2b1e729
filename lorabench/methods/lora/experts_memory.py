"""LoRA on raw parameters (PEFT's ``target_parameters``: Mixtral's fused experts and router), estimator terms.

PEFT's ``ParamWrapper`` (docs/SOURCES.md#peft-param-fold), which lorabench's runtime
(:mod:`lorabench.methods.lora.experts`) follows op for op, folds the update into the parameter for the
duration of the module's forward and lets the module run on the folded weight:

* a 3-D expert tensor W (E x out x in): ``W' = baddbmm(W, B_e, A_e, alpha=scaling)`` with A reshaped to
  E x r x in and B to E x out x r, both cast to W's dtype (copies when the adapters are fp32, which baddbmm
  saves for its backward);
* a 2-D parameter (the router, out x in): ``W' = W + (scaling * B A).to(W.dtype)``.

W' is a new tensor of the parameter's full size that requires grad, so the matmul that uses it saves it (for
its input gradient) and saves its own input (for W's gradient): an adapted expert tensor keeps one weight-sized
copy per layer alive until backward, and backward makes its weight-sized gradient before the fold reduces it
to A's and B's. Checked against fake-tensor traces of PEFT's stack and lorabench's
(tests/methods/test_expert_lora.py).
"""

from __future__ import annotations

from lorabench.memory.autograd import Graph, Sym
from lorabench.methods.fused_experts import select_parameters
from lorabench.methods.lora.config import LoraConfig
from lorabench.methods.protocols import LayerCtx
from lorabench.methods.terms import adapter_dtype, is_target
from lorabench.specs import DTYPE_BYTES, MatrixSpec, ModelSpec


def raw_targets(model: ModelSpec, cfg: LoraConfig) -> tuple[MatrixSpec, ...]:
    """The raw parameters of a decoder layer that ``target_parameters`` adapts (() without it)."""
    return select_parameters(model, cfg.target_parameters, cfg.name)


def folded_weight(g: Graph, m: MatrixSpec, r: int, param_dtype: str, lora_dtype: str) -> Sym:
    """The fold as one node: output W' (copies x out x in, parameter dtype, requires grad); its backward
    creates A's and B's gradients (copies r (in + out) elements in the adapter dtype) from W's gradient."""
    e, i, o = m.copies, m.in_features, m.out_features
    p = DTYPE_BYTES[param_dtype]
    if e > 1:  # baddbmm saves lhs (E x out x r) and rhs (E x r x in): new tensors when the cast copies
        if lora_dtype != param_dtype:
            g.save(g.new(e * o * r, param_dtype, True), g.new(e * r * i, param_dtype, True))
        scratch = e * r * (i + o) * p  # gradients of lhs and rhs before their cast back
    else:  # B A and its scaled copy (adapter dtype), cast: nothing saved but the (free) parameters
        scratch = o * i * (DTYPE_BYTES[lora_dtype] + p)
    grads = e * r * (i + o) * DTYPE_BYTES[lora_dtype]
    return g.record((), g.new(e * o * i, param_dtype, True), param_grad_bytes=int(grads), transient_bytes=int(scratch))


def routed_factors(g: Graph, m: MatrixSpec, r: int, param_dtype: str, lora_dtype: str) -> Sym:
    """``experts_path="routed"`` (:mod:`lorabench.methods.lora.experts_routed`): what the expert matmul uses
    besides the frozen tensor is A and B cast to the activations' dtype (copies r (in + out) elements, saved
    for the input gradient); the matmul still saves its input for A's gradient, and nothing weight-sized exists."""
    e, i, o = m.copies, m.in_features, m.out_features
    grads = e * r * (i + o) * DTYPE_BYTES[lora_dtype]
    return g.record((), g.new(e * r * (i + o), param_dtype, True), param_grad_bytes=int(grads),
                    transient_bytes=int(e * r * (i + o) * DTYPE_BYTES[param_dtype]))


def adapted_weight(g: Graph, m: MatrixSpec, ctx: LayerCtx) -> Sym | None:
    """W' for an adapted raw parameter (the routed path's cast factors for an expert tensor with
    ``experts_path="routed"``), None for one ``target_parameters`` leaves frozen."""
    if not is_target(m, raw_targets(ctx.model, ctx.method)):
        return None
    make = routed_factors if ctx.method.routes(m) else folded_weight
    return make(g, m, ctx.method.rank_for(m.parameter_path), ctx.param_dtype, adapter_dtype(ctx.method, ctx.train))


def raw_adapter_params(model: ModelSpec, cfg: LoraConfig) -> int:
    """L * sum over adapted raw parameters of copies * r * (in + out) (A: r E x in, B: out x r E; r per target,
    :meth:`LoraConfig.rank_for`)."""
    return model.num_layers * sum(m.copies * cfg.rank_for(m.parameter_path) * (m.in_features + m.out_features)
                                  for m in raw_targets(model, cfg))


def largest_raw_adapter_params(model: ModelSpec, cfg: LoraConfig) -> int:
    """The largest A or B of an adapted raw parameter (0 without ``target_parameters``)."""
    return max((m.copies * cfg.rank_for(m.parameter_path) * max(m.in_features, m.out_features)
                for m in raw_targets(model, cfg)), default=0)
