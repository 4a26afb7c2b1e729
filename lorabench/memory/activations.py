"""Activation and logits memory: the symbolic forward of a decoder layer and of the LM head + loss.

The layer programs mirror transformers' modeling code (LlamaDecoderLayer and its Mistral/Qwen2/Gemma-2/
Phi-3/Mixtral relatives, GPT2Block) op by op; :mod:`lorabench.memory.autograd` says which tensors each op
saves. Methods plug in through their estimator (:class:`~lorabench.methods.protocols.Estimator`: ``linear`` for the projections, ``after_sublayer``
for bottleneck adapters, ``prefix_tokens`` for prefix tuning). Verified against the fake-tensor trace
(``lorabench trace``), which observes the real autograd graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorabench.memory.autograd import Graph, Sym
from lorabench.memory.loss import chunked_loss_peak_bytes
from lorabench.methods.protocols import Estimator, LayerCtx
from lorabench.specs import DTYPE_BYTES, MatrixSpec, ModelSpec, TrainSpec


def layer_ctx(model: ModelSpec, method: Any, train: TrainSpec, hooks: Estimator) -> LayerCtx:
    """The context of one GPU's micro-batch for a method's estimator hooks."""
    return LayerCtx(model=model, train=train, method=method, hooks=hooks, tokens=train.tokens_per_step,
                    param_dtype=train.param_dtype, train_base=hooks.trains_base)


def _matrix(model: ModelSpec, leaf_name: str) -> MatrixSpec:
    for m in model.matrices:
        if m.name == leaf_name:
            return m
    raise KeyError(leaf_name)


def _proj(g: Graph, x: Sym, ctx: LayerCtx, name: str) -> Sym:
    return ctx.hooks.linear(g, x, _matrix(ctx.model, name), ctx)


def _norm(g: Graph, x: Sym, ctx: LayerCtx) -> Sym:
    h = ctx.model.hidden_size
    if ctx.model.norm_kind == "layernorm":
        return g.layer_norm(x, ctx.tokens, h, ctx.train_base)
    return g.rms_norm(x, ctx.tokens, h, ctx.train.norm_param_dtype, ctx.train_base)


def _rope(g: Graph, x: Sym) -> Sym:
    """q*cos + rotate_half(q)*sin: cos/sin do not need grad, so only they (shared, tiny) are saved."""
    return g.elementwise(x)


def _attention_block(g: Graph, x: Sym, ctx: LayerCtx) -> Sym:
    m, t = ctx.model, ctx.tokens
    d, nh, nkv = m.head_dim, m.num_heads, m.num_kv_heads
    arch = m.traits
    v_tokens = ctx.hooks.prefix_tokens(ctx.method)
    if arch.qkv == "fused_views":
        # c_attn output split into q, k, v views of one storage; no rotary embedding.
        # Saving the three views keeps the one qkv storage alive: pass the same tensor thrice.
        qkv = _proj(g, x, ctx, arch.attn_in[0])
        q = k = v = qkv
        v_numel = t * nkv * d
    elif arch.qkv == "fused_slices":
        qkv = _proj(g, x, ctx, arch.attn_in[0])
        # q, k, v are slices of one tensor; RoPE makes new q and k; v stays a view of qkv.
        q = _rope(g, g.elementwise(qkv, numel=t * nh * d))
        k = _rope(g, g.elementwise(qkv, numel=t * nkv * d))
        v = qkv  # a view: saving it keeps the whole qkv storage
        v_numel = t * nkv * d
    else:
        q_name, k_name, v_name = arch.attn_in
        q = _rope(g, _proj(g, x, ctx, q_name))
        k = _rope(g, _proj(g, x, ctx, k_name))
        v = _proj(g, x, ctx, v_name)
        v_numel = v.numel
    eager = ctx.train.attention == "eager"
    kv_len = ctx.seq + v_tokens
    if v_tokens:
        # DynamicCache.update concatenates the prefix in front: new K/V tensors of V+T positions.
        prefix_numel = ctx.batch * nkv * d * v_tokens
        k = g.cat(k, g.new(prefix_numel, k.dtype, True))
        v = g.cat(g.new(v_numel, v.dtype, v.requires_grad) if v is q else v, g.new(prefix_numel, v.dtype, True))
    repeat = nh // nkv if (eager or v_tokens) else 1
    out = g.attention(q, k, v, ctx.batch, nh, ctx.seq, kv_len, eager, repeat, out_numel=t * nh * d,
                      masked=bool(v_tokens), softcap=ctx.model.traits.attn_logit_softcapping)
    return _proj(g, out, ctx, arch.attn_out)


def _act(g: Graph, x: Sym, model: ModelSpec) -> Sym:
    if model.traits.hidden_act == "gelu_new":
        # 0.5*x*(1+tanh(c*(x+0.044715*x^3))): pow saves x, tanh its result, the last mul both factors.
        inner = g.add(x, g.scale(g.unary_save_input(x)))
        th = g.unary_save_output(g.scale(inner))
        return g.mul(g.scale(x), g.elementwise(th))
    return g.unary_save_input(x)  # F.gelu(approximate='tanh') / silu save their input


def _mlp_block(g: Graph, x: Sym, ctx: LayerCtx) -> Sym:
    m = ctx.model
    kind, names = m.traits.mlp, m.traits.mlp_modules
    if kind == "plain":
        fc, proj = names
        return _proj(g, _act(g, _proj(g, x, ctx, fc), m), ctx, proj)
    if kind == "fused_gated":
        # gate, up = chunk(2): views of one storage. silu(gate) and gate*up save views, i.e. the whole gu.
        gate_up, down = names
        gu = _proj(g, x, ctx, gate_up)
        if gu.requires_grad:
            g.save(gu)
        act = g.elementwise(gu, numel=gu.numel // 2)
        h = g.mul(act, gu, numel=act.numel)
        return _proj(g, h, ctx, down)
    if kind == "moe" or m.is_moe:
        return _moe_block(g, x, ctx)
    gate_name, up_name, down_name = names
    act = _act(g, _proj(g, x, ctx, gate_name), m)
    up = _proj(g, x, ctx, up_name)
    return _proj(g, g.mul(act, up), ctx, down_name)


def _moe_block(g: Graph, x: Sym, ctx: LayerCtx) -> Sym:
    """Mixtral (transformers >= 5, grouped-mm experts): router softmax, then each token visits k experts.

    Saved (checked against the trace): the router's fp32 softmax (T x E), the experts' gate_up output
    (T*k x 2I; silu and the product keep views of it), silu's output (T*k x I) and the down output (T*k x h,
    saved by the multiplication with the routing weights). A weight that needs a gradient (full fine-tuning,
    or the folded weight of LoRA's ``target_parameters``, from the method's ``adapted_weight`` hook) makes its
    matmul save its input: the normed input (T x h) for the router, the routed inputs (T*k x h) for gate_up,
    the product (T*k x I) for down; a folded weight is itself saved when its matmul's input needs grad.
    """
    m, t = ctx.model, ctx.tokens
    k, inter, h = m.experts_per_token, m.intermediate_size, m.hidden_size
    train = ctx.train_base
    router, gate_up, down_proj = _moe_matrices(m)
    # Each folded weight is made when the forward first reads the parameter, right before its matmul.
    logits = _expert_matmul(g, x, ctx.hooks.adapted_weight(g, router, ctx), router, t, train)
    if logits.requires_grad:
        g.save(g.new(t * m.num_experts, "fp32", True))  # softmax's output
    weights = g.record((logits,), g.new(t * k, "fp32", logits.requires_grad))  # top-k, renormalized
    if logits.requires_grad:  # top-k's indices, the values' copy and their sum (the renormalizing division)
        g.save(g.new(t * k, "int64", False), g.new(t * k, "fp32", False), g.new(t, "fp32", False))
    routed = g.elementwise(x, numel=t * k * h)  # hidden_states[perm // k]: saves the (int64) indices only
    if x.requires_grad or logits.requires_grad:  # the sort's permutation, perm // k and the inverse order
        g.save(*(g.new(t * k, "int64", False) for _ in range(3)))
    gu = _expert_matmul(g, routed, ctx.hooks.adapted_weight(g, gate_up, ctx), gate_up, t * k, train)
    prod = _swiglu(g, gu, t * k * inter)
    down = _expert_matmul(g, prod, ctx.hooks.adapted_weight(g, down_proj, ctx), down_proj, t * k, train)
    weighted = g.mul(down, weights, numel=t * k * h)
    return g.record((weighted,), g.new(t * h, x.dtype, weighted.requires_grad))  # summed over the k experts


def _swiglu(g: Graph, gu: Sym, numel: int) -> Sym:
    """``silu(gate) * up`` with ``gate, up = gu.chunk(2)`` as one node: saves gu (gate and up are views of it)
    and silu's output; its backward holds gu's 2n-element gradient beside the output's and nothing more at
    its fullest (Mixtral-8x7B traces with checkpointing: modelling gate's and up's gradients as separate
    tensors over-predicted the peak by up to 1.4%)."""
    act = g.new(numel, gu.dtype, gu.requires_grad)
    if gu.requires_grad:
        g.save(gu, act)
    out = g.new(numel, gu.dtype, gu.requires_grad)
    return g.record((gu,), out)


def _expert_matmul(g: Graph, inp: Sym, folded: Sym | None, m: MatrixSpec, rows: int, train: bool) -> Sym:
    """``inp @ W^T`` (``rows`` x ``m.out_features``) of an MoE raw parameter: saves ``inp`` iff W needs grad
    (``train``, or a folded W'), and a folded W' iff ``inp`` needs grad (the parameter itself costs nothing to
    save). Under autocast the input is first cast to the autocast dtype (an fp32 residual stream, as fp32 norms
    make it, gives a copy). With LoRA's routed expert path ``folded`` is the cast factors, not a W'."""
    if g.autocast is not None:
        inp = g.to(inp, g.autocast)
    if train or folded is not None:
        g.save(inp)
    if folded is not None and inp.requires_grad:
        g.save(folded)
    out = g.new(rows * m.out_features, inp.dtype, inp.requires_grad or train or folded is not None)
    return g.record((inp,) if folded is None else (inp, folded), out)


def _moe_matrices(model: ModelSpec) -> tuple[MatrixSpec, MatrixSpec, MatrixSpec]:
    """(router, gate_up, down) of an MoE layer: the raw parameters in the order the block uses them."""
    raw = [mat for mat in model.matrices if not mat.is_linear]
    router = next(mat for mat in raw if mat.copies == 1)
    gate_up = next(mat for mat in raw if mat.copies > 1 and not mat.feedforward)
    down = next(mat for mat in raw if mat.copies > 1 and mat.feedforward)
    return router, gate_up, down


@dataclass(frozen=True)
class LayerMemory:
    """One decoder layer: bytes saved for backward, the peak while its backward runs (saved tensors +
    gradients, starting from the output's gradient), and whether its output requires grad."""

    saved_bytes: int
    backward_peak_bytes: int
    output_requires_grad: bool
    backward_peak_param_grad_bytes: int = 0
    param_grad_bytes: int = 0
    """All parameter gradients this layer's backward creates."""
    forward_peak_bytes: int = 0
    """Saved tensors + live temporaries at the fullest moment of the layer's forward (or its recompute)."""


def layer_memory(ctx: LayerCtx, input_requires_grad: bool) -> LayerMemory:
    """Symbolic forward (and backward replay) of one decoder layer."""
    g, out = _layer_graph(ctx, _residual_dtype(ctx), input_requires_grad)
    peak, grads = g.backward_peak(out) if out.requires_grad else (g.saved_bytes, 0)
    return LayerMemory(g.saved_bytes, peak - grads, out.requires_grad, grads,
                       sum(op.param_grad_bytes for op in g.tape), g.forward_peak)


def _layer_graph(ctx: LayerCtx, input_dtype: str, input_requires_grad: bool) -> tuple[Graph, Sym]:
    """The decoder layer's symbolic forward on an input hidden state of ``input_dtype``: (graph, output)."""
    g = Graph(autocast=ctx.train.autocast_dtype)
    x = g.new(ctx.tokens * ctx.model.hidden_size, input_dtype, input_requires_grad)
    attn = _attention_block(g, _norm(g, x, ctx), ctx)
    attn = ctx.hooks.after_sublayer(g, attn, ctx, "attention")
    if ctx.model.traits.post_norms:
        attn = _norm(g, attn, ctx)  # post_attention_layernorm
    h = g.add(x, attn)
    g.hold(h)  # the residual stays alive through the MLP block
    mlp = _mlp_block(g, _norm(g, h, ctx), ctx)
    mlp = ctx.hooks.after_sublayer(g, mlp, ctx, "mlp")
    if ctx.model.traits.post_norms:
        mlp = _norm(g, mlp, ctx)  # post_feedforward_layernorm
    out = g.add(h, mlp)
    g.drop(h)
    return g, out


def _residual_dtype(ctx: LayerCtx) -> str:
    """The residual stream's dtype: the parameter dtype (fp32 under autocast: fp32 embeddings + 16-bit adds),
    unless norms wider than the other parameters make a layer's output wider (fp32 norms before 4-bit layers,
    which return their input's dtype: the MLP output, hence the stream, turns fp32 from the first layer on;
    observed in the trace of recipe qlora-paper)."""
    if ctx.train.norm_param_dtype == ctx.param_dtype:
        return ctx.param_dtype
    return _layer_graph(ctx, ctx.param_dtype, False)[1].dtype


def checkpoint_saved_bytes(ctx: LayerCtx) -> int:
    """Non-reentrant gradient checkpointing keeps each layer's input hidden state (Chen et al. 2016)."""
    return int(ctx.tokens * ctx.model.hidden_size * DTYPE_BYTES[_residual_dtype(ctx)])


def incoming_gradient_bytes(ctx: LayerCtx) -> int:
    """Gradient buffers alive when the top checkpointed layer recomputes its forward.

    Observed in the trace (runtime/trace.py ``peak_tensors``): after the final RMSNorm's backward in a
    16-bit model, the engine still holds its fp32 gradient and three 16-bit partial gradients of the
    hidden state (T*h*(4 + 3*2) bytes) while the checkpointed layer recomputes; with fp32 weights (or
    LayerNorm) only the hidden-state gradient itself.
    """
    th = ctx.tokens * ctx.model.hidden_size
    e = DTYPE_BYTES[_residual_dtype(ctx)]
    if ctx.model.norm_kind == "rmsnorm" and e < 4:
        return int(th * (4 + 3 * e))
    return int(th * e)


def head_saved_bytes(ctx: LayerCtx, input_requires_grad: bool) -> int:
    """Final norm + lm_head: the norm's saved tensors, and the lm_head input when the head trains."""
    g = Graph(autocast=ctx.train.autocast_dtype)
    x = g.new(ctx.tokens * ctx.model.hidden_size, _residual_dtype(ctx), input_requires_grad)
    h = _norm(g, x, ctx)
    m = ctx.model
    if ctx.train.loss != "chunked":  # the chunked loss saves nothing: it forms its gradients in the forward
        g.linear(h, m.vocab_size, m.hidden_size, ctx.param_dtype, ctx.train_base)
    return g.saved_bytes


def logits_peak_bytes(ctx: LayerCtx) -> int:
    """Peak bytes of the logits and cross-entropy during backward, per transformers' ForCausalLMLoss.

    Everything here is reported as the planner's ``logits`` component.

    logits = lm_head(h) in the compute dtype (b*s*V); loss upcasts ``logits.float()`` and runs
    log_softmax (saves its fp32 result) + nll_loss. The training step drops the model output, so the
    16-bit logits die after the forward. Backward of log_softmax holds its saved output, the incoming
    gradient and the new gradient: 3 x 4 bytes x b*s*V; the forward's own peak is 16-bit logits + fp32 copy
    + log_softmax output. Gemma-2 soft-capping (tanh) saves one more fp32 copy. ``loss=chunked``:
    :func:`lorabench.memory.loss.chunked_loss_peak_bytes` instead.
    """
    if ctx.train.loss == "chunked":
        train = ctx.train
        return chunked_loss_peak_bytes(ctx.tokens, ctx.model.hidden_size, ctx.model.vocab_size,
                                       hidden_bytes=DTYPE_BYTES[_residual_dtype(ctx)],
                                       compute_bytes=DTYPE_BYTES[train.compute_dtype],
                                       weight_bytes=DTYPE_BYTES[train.param_dtype], weight_grad=ctx.train_base,
                                       weight_cast=train.param_dtype != train.compute_dtype,
                                       softcap=bool(ctx.model.hf_config.get("final_logit_softcapping")))
    tv = ctx.tokens * ctx.model.vocab_size
    e = DTYPE_BYTES[ctx.train.compute_dtype]
    saved = 4 * tv
    if ctx.model.traits.final_logit_softcapping:
        saved += 4 * tv if e == 4 else 2 * tv
    return int(saved + 2 * 4 * tv)
