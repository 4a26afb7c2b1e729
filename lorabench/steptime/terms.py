"""Work of the base model's op classes per micro-step on one GPU (torch-free; formulas cited inline).

Notation: T = b*s tokens of the micro-batch, L layers, h hidden, V vocabulary, e bytes per element of the
compute dtype, p bytes of the stored weight dtype.
"""

from __future__ import annotations

from lorabench.specs import DTYPE_BYTES, MatrixSpec, ModelSpec, OptimizerSpec, TrainSpec
from lorabench.steptime.work import Work

#: Ops (aten calls) per op group as transformers 5 + torch 2.13 dispatch them in one training step of a Llama
#: layer, counted with a TorchDispatchMode (tests/steptime/test_op_counts.py keeps these honest): each costs a
#: fixed dispatch/launch overhead on top of its roofline time.
OPS_PER_LINEAR = 4
OPS_PER_LINEAR_WEIGHT_GRAD = 5
#: Extra ops per checkpointed layer besides its recomputed forward (detach, saved-tensor hooks, RNG state).
CHECKPOINT_OPS_PER_LAYER = 40

#: Leaf names of the attention output projections (their input is the attention output, not the norm's).
_ATTN_OUTPUTS = ("o_proj", "c_proj", "out_proj", "dense")


def _active_copies(model: ModelSpec, m: MatrixSpec) -> int:
    """Expert matrices a token visits: top-k of the experts (Mixtral, Jiang et al. 2024, arXiv:2401.04088)."""
    return model.experts_per_token if m.copies > 1 and model.experts_per_token else m.copies


def layer_matmul_params(model: ModelSpec) -> int:
    """Weights one token multiplies in one decoder layer (MoE: only the k experts it is routed to)."""
    return sum(m.in_features * m.out_features * _active_copies(model, m) for m in model.matrices)


def _first_layer_input_params(model: ModelSpec) -> int:
    """Layer-0 matrices reading the first norm's output: with frozen embeddings their input needs no
    gradient, so autograd skips their input-gradient matmul."""
    return sum(m.in_features * m.out_features * _active_copies(model, m) for m in model.matrices
               if m.kind == "attention" and m.leaf not in _ATTN_OUTPUTS)


def _matmul_bytes(model: ModelSpec, tokens: int, e: float) -> float:
    """Bytes one pass of every matmul moves: weights read once plus input read and output written
    (T*(in + out) per matrix), in the compute dtype."""
    per_layer = sum((m.in_features * m.out_features * _active_copies(model, m) if m.copies == 1 else
                     m.in_features * m.out_features * m.copies) * e
                    + tokens * (m.in_features + m.out_features) * _active_copies(model, m) * e
                    for m in model.matrices)
    head = model.vocab_size * model.hidden_size * e + tokens * (model.hidden_size + model.vocab_size) * e
    return model.num_layers * per_layer + head


def dense_forward(model: ModelSpec, train: TrainSpec) -> Work:
    """2 FLOPs per weight per token (Kaplan et al. 2020, arXiv:2001.08361, Sec. 2.1): 2T(L*P_layer + V*h).

    Ops per linear: transpose, mm, and the two reshapes around it (4, counted on the real stack, see
    :data:`OPS_PER_LINEAR`)."""
    t, e = train.tokens_per_step, DTYPE_BYTES[train.compute_dtype]
    flops = 2.0 * t * (model.num_layers * layer_matmul_params(model) + model.vocab_size * model.hidden_size)
    return Work(flops, _matmul_bytes(model, t, e), OPS_PER_LINEAR * (model.num_layers * len(model.matrices) + 1))


def dense_input_grad(model: ModelSpec, train: TrainSpec, trains_base: bool) -> Work:
    """dL/dx = dL/dy W: the same 2 FLOPs per weight per token as forward, needed by every frozen layer
    too (gradients must reach the adapters below); skipped for layer 0's inputs from frozen embeddings."""
    fwd = dense_forward(model, train)
    skip = 0 if trains_base else 2.0 * train.tokens_per_step * _first_layer_input_params(model)
    return Work(fwd.flops - skip, fwd.bytes, fwd.kernels)


def dense_weight_grad(model: ModelSpec, train: TrainSpec, trains_base: bool) -> Work:
    """dL/dW = dL/dy^T x for trainable base weights only (full fine-tuning): 2T(L*P_layer + V*h), plus the
    bias reductions."""
    if not trains_base:
        return Work()
    fwd = dense_forward(model, train)
    biases = sum(1 for m in model.matrices if m.bias)
    ops = OPS_PER_LINEAR_WEIGHT_GRAD * (model.num_layers * len(model.matrices) + 1) + model.num_layers * biases
    return Work(fwd.flops, fwd.bytes, ops)


def attention(model: ModelSpec, train: TrainSpec, prefix_tokens: int) -> tuple[Work, Work]:
    """(forward, backward) of the score and value matmuls of all layers.

    Forward FLOPs per layer: 4*b*heads*d*s*k (QK^T and PV), k the keys each query sees: s/2 with a causal
    flash/sdpa kernel that skips masked blocks (Dao 2023, FlashAttention-2, arXiv:2307.08691, Sec. 3.1),
    s + V with a mask (prefix tuning) or eager attention. Backward = 2.5x forward FLOPs (5 matmuls instead
    of 2, ibid.). Eager attention also writes and reads the b*heads*s*k scores: forward the matmul output,
    scale+mask, fp32 softmax and its cast back ((6e + 8) bytes per score), backward twice that.
    """
    b, s, nh, d = train.micro_batch_size, train.seq_len, model.num_heads, model.head_dim
    e = DTYPE_BYTES[train.compute_dtype]
    kv = s + prefix_tokens
    eager = train.attention == "eager"
    keys = s / 2 if (not eager and prefix_tokens == 0) else kv
    flops = 4.0 * b * nh * d * s * keys * model.num_layers
    qkvo = b * d * (2 * s * nh + 2 * kv * model.num_kv_heads) * e * model.num_layers
    scores = b * nh * s * kv * model.num_layers
    fwd = Work(flops, qkvo + ((6 * e + 8) * scores if eager else 0), (14 if eager else 8) * model.num_layers)
    bwd = Work(2.5 * flops, 2.5 * qkvo + (2 * (6 * e + 8) * scores if eager else 0),
               (14 if eager else 6) * model.num_layers)
    return fwd, bwd


def _norm_bytes_per_elem(model: ModelSpec, e: float) -> tuple[float, int]:
    """(forward bytes per element, kernels) of one norm as transformers writes it.

    RMSNorm (LlamaRMSNorm): x.to(fp32) (e+4), pow (4+4), mean (4), * rsqrt (4+4), .to(dtype) (4+e),
    * weight (e+e): 28 + 4e bytes, 8 kernels with rsqrt/add-eps; without the casts (fp32): 28, 6 kernels.
    LayerNorm: one fused kernel reading and writing the tensor (2e).
    """
    if model.norm_kind == "layernorm":
        return 2 * e, 1
    return (28 + 4 * e, 8) if e < 4 else (28.0, 6)


def layer_elementwise(model: ModelSpec, train: TrainSpec) -> tuple[Work, Work]:
    """(forward, backward) memory-bound ops of all decoder layers besides matmuls and attention.

    Per layer and token: 2 norms (4 for Gemma-2); RoPE on q and k (q*cos + rotate_half(q)*sin: ~9e per
    element, 6 kernels each); 2 residual adds (3e*h); the MLP activation (gated: silu + mul, 5e*I;
    GELU-tanh ~16e*I); the attention output's transpose copy (2e per element). Backward moves about twice
    the forward bytes (each op reads its saved input and the incoming gradient, writes a gradient) in about
    1.8x the ops. Under autocast each fp32 weight is cast to 16 bit once per forward (6 bytes/weight).
    """
    t, h, e = train.tokens_per_step, model.hidden_size, DTYPE_BYTES[train.compute_dtype]
    nh, nkv, d, inter = model.num_heads, model.num_kv_heads, model.head_dim, model.intermediate_size
    norms = model.traits.norms_per_layer
    norm_b, norm_k = _norm_bytes_per_elem(model, e)
    rope = model.traits.rotary
    gated = model.gated_mlp
    per_token = (norms * norm_b * h + (9 * e * (nh + nkv) * d if rope else 0) + 2 * 3 * e * h
                 + (5 * e if gated else 16 * e) * inter * (model.experts_per_token or 1) + 2 * e * nh * d)
    kernels = norms * norm_k + (14 if rope else 0) + 2 + (2 if gated else 8) + 7
    cast = 6.0 * layer_matmul_params(model) if train.autocast_dtype and train.param_dtype == "fp32" else 0.0
    fwd = Work(0.0, model.num_layers * (t * per_token + cast),
               model.num_layers * (kernels + (len(model.matrices) if cast else 0)))
    bwd = Work(0.0, model.num_layers * 2 * t * per_token, model.num_layers * 1.8 * kernels)
    return fwd, bwd


#: Ops outside the decoder layers: embedding, position ids, rotary cos/sin, mask, final norm, lm_head, loss.
HEAD_FORWARD_OPS = 50
HEAD_BACKWARD_OPS = 37


def head_and_loss(model: ModelSpec, train: TrainSpec, trains_base: bool) -> tuple[Work, Work]:
    """(forward, backward) of the embedding lookup, the final norm and the cross-entropy over b*s*V logits.

    transformers' ForCausalLMLoss: logits.float() (e+4 per logit), log_softmax (read twice for max and
    sum, write once: 12), nll; backward: the nll gradient (4), log_softmax backward (12), the cast back
    (4+e). The embedding gather writes T*h*p; with trainable embeddings its backward zero-fills the V*h
    gradient and scatter-adds T rows.
    """
    t, h, v = train.tokens_per_step, model.hidden_size, model.vocab_size
    e, p = DTYPE_BYTES[train.compute_dtype], DTYPE_BYTES[train.param_dtype]
    norm_b, norm_k = _norm_bytes_per_elem(model, e)
    emb_bwd = (v * h * p + 2 * t * h * p) if trains_base else 0.0
    if train.loss == "chunked":
        return _chunked_loss(model, train, norm_b, emb_bwd)
    fwd = Work(0.0, t * v * (e + 4 + 12) + t * h * (norm_b + p), HEAD_FORWARD_OPS)
    bwd = Work(0.0, t * v * (4 + 12 + 4 + e) + 2 * t * h * norm_b + emb_bwd, HEAD_BACKWARD_OPS)
    return fwd, bwd


#: aten ops per chunk of lorabench's chunked loss (lorabench/runtime/loss.py ``_chunk``): the lm_head mm,
#: float, amax, sub_, gather, exp_, sum, log, sub, mul, sum, div_, scatter_add_, mul_, cast, the dh mm and
#: its copy (+ the dW addmm and its casts when lm_head trains).
CHUNKED_LOSS_OPS_PER_CHUNK = 17


def _chunked_loss(model: ModelSpec, train: TrainSpec, norm_b: float, emb_bwd: float) -> tuple[Work, Work]:
    """The chunked loss (``loss=chunked``): its gradients are formed in the forward, chunk by chunk.

    Per logit: float (e + 4), amax (4), sub_ (8), exp_ (8), sum (4), div_ (8), mul_ (8), the cast of the
    gradient (4 + e): 2e + 48 bytes, all in the forward, plus writing the hidden-state gradient (T h e); the
    backward only scales that gradient in place (2 T h e). The lm_head matmuls keep their FLOPs (counted with
    the dense work); soft-capping's extra passes are not modelled.
    """
    from lorabench.memory.loss import chunk_tokens

    t, h, v = train.tokens_per_step, model.hidden_size, model.vocab_size
    e, p = DTYPE_BYTES[train.compute_dtype], DTYPE_BYTES[train.param_dtype]
    chunks = -(-t // chunk_tokens(t, v))
    fwd = Work(0.0, t * v * (2 * e + 48) + t * h * (norm_b + p + e),
               HEAD_FORWARD_OPS + CHUNKED_LOSS_OPS_PER_CHUNK * chunks)
    bwd = Work(0.0, 2 * t * h * e + 2 * t * h * norm_b + emb_bwd, HEAD_BACKWARD_OPS)
    return fwd, bwd


#: Full passes over an optimizer-state-sized tensor per step (reads + writes).
#: torch AdamW foreach (torch/optim/adamw.py _multi_tensor_adamw): weight decay mul_ (2), lerp_ of m (3),
#: mul_ + addcmul_ of v (5), sqrt (2), div_ (2), add_ eps (2), addcdiv_ into p (4) = 20 passes, 8 foreach
#: ops; fused=True reads p, g, m, v and writes p, m, v once (7). SGD: add_ (3); with momentum mul_/add_ of
#: the buffer and add_ into p (8).
OPTIMIZER_PASSES = {"adamw": 20, "paged_adamw": 20, "sgd": 3, "sgd_momentum": 8}
OPTIMIZER_FOREACH_OPS = {"adamw": 8, "paged_adamw": 8, "sgd": 1, "sgd_momentum": 3}


def optimizer_step(optimizer: OptimizerSpec, params: int, tensors: int, param_bytes: float,
                   per_tensor_loop: bool, impl: str = "foreach") -> Work:
    """One optimizer step over ``params`` trainable elements in ``tensors`` tensors.

    8-bit Adam (Dettmers et al. 2022, arXiv:2110.02861; bitsandbytes' fused blockwise kernel): reads p and
    g, reads and writes the 1-byte m and v plus their absmax: 3p + 4 bytes per element, one kernel per
    tensor. torch optimizers: :data:`OPTIMIZER_PASSES` passes of the parameter's dtype. On CUDA a foreach op
    launches one kernel per ~48 tensors (multi_tensor_apply chunks); on the CPU it loops tensor by tensor.
    """
    name = optimizer.name
    if name.endswith("8bit"):
        return Work(0.0, params * (3 * param_bytes + 4 + 4 / 256 * 2), tensors)
    passes = OPTIMIZER_PASSES.get(name, 20)
    if impl == "fused" and name in ("adamw", "paged_adamw"):  # one kernel per ~48 tensors, 7 passes
        return Work(0.0, params * param_bytes * 7, tensors if per_tensor_loop else -(-tensors // 48))
    if impl == "for-loop":  # the per-parameter loop: the same passes, every op once per tensor
        return Work(0.0, params * param_bytes * passes, OPTIMIZER_FOREACH_OPS.get(name, 8) * tensors)
    ops = OPTIMIZER_FOREACH_OPS.get(name, 8)
    # on the CPU torch's foreach path also reads each tensor's step counter back (2 scalar ops per tensor)
    launches = ops + 6 + 2 * tensors if per_tensor_loop else ops * -(-tensors // 48)
    return Work(0.0, params * param_bytes * passes, launches)
