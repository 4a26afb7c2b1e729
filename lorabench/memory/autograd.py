"""A symbolic autograd: which tensors a forward pass keeps for backward, without running it (stdlib only).

Activation memory is the sum of the distinct tensors autograd saves. Closed forms such as Korthikanti et
al. 2022 (arXiv:2205.05198, Sec. 4.1: ``sbh(34 + 5as/h)`` for GPT with dropout) fix one precision, one
activation function and one set of trainable weights. Fine-tuning changes all three: a frozen linear saves
nothing of its input, an fp32 LoRA adapter saves an fp32 copy of it, autocast saves 16-bit weight copies.
So the planner walks the layer's ops symbolically and applies each op's save rule from PyTorch's
``tools/autograd/derivatives.yaml`` (e.g. ``mm``: self saved iff mat2 needs grad; ``pow``: self;
``rsqrt``/``tanh``: result; ``silu``/``gelu``: self; flash/efficient attention: q, k, v, out, logsumexp).
Each tensor is counted once however many ops save it, exactly like storage-level tracking.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from lorabench.specs import DTYPE_BYTES

_ids = itertools.count()


@dataclass(frozen=True)
class Sym:
    """A symbolic tensor: element count, dtype name, and whether it requires grad."""

    numel: int
    dtype: str
    requires_grad: bool
    is_param: bool = False
    uid: int = field(default_factory=lambda: next(_ids))

    @property
    def nbytes(self) -> int:
        return int(self.numel * DTYPE_BYTES[self.dtype])


def promote(a: str, b: str) -> str:
    """Type promotion of two float dtypes (fp32 wins; bf16 with fp16 gives fp32)."""
    if a == b:
        return a
    return "fp32"


@dataclass
class Graph:
    """Collects saved tensors. ``autocast`` is the 16-bit dtype matmuls run in, or None."""

    autocast: str | None = None
    saved: dict[int, int] = field(default_factory=dict)

    # ---- bookkeeping ----
    def new(self, numel: int, dtype: str, requires_grad: bool) -> Sym:
        return Sym(int(numel), dtype, requires_grad)

    def param(self, numel: int, dtype: str, requires_grad: bool) -> Sym:
        """A parameter: saving it for backward costs no new memory."""
        return Sym(int(numel), dtype, requires_grad, is_param=True)

    def save(self, *tensors: Sym) -> None:
        for t in tensors:
            if not t.is_param:
                self.saved[t.uid] = t.nbytes

    @property
    def saved_bytes(self) -> int:
        return sum(self.saved.values())

    # ---- ops (save rules from derivatives.yaml) ----
    def to(self, x: Sym, dtype: str) -> Sym:
        """``x.to(dtype)``: a no-op when the dtype matches, else a copy; saves nothing."""
        return x if x.dtype == dtype else self.new(x.numel, dtype, x.requires_grad)

    def linear(self, x: Sym, out_features: int, in_features: int, weight_dtype: str, weight_grad: bool,
               bias_grad: bool = False) -> Sym:
        """y = x W^T (+ b). Saves x iff W needs grad; saves W iff x needs grad.

        W is a parameter (no new bytes) unless autocast casts it: the 16-bit copy is then a new tensor,
        saved when x needs grad (frozen weights too: autocast caches only leaves that require grad, and
        the saved copy lives until the op's backward).
        """
        rows = x.numel // in_features
        dtype = weight_dtype
        if self.autocast is not None:
            x = self.to(x, self.autocast)
            dtype = self.autocast
            if x.requires_grad and weight_dtype != self.autocast:
                self.save(self.new(out_features * in_features, self.autocast, weight_grad))
        elif x.dtype != weight_dtype:
            raise ValueError(f"linear with input {x.dtype} and weight {weight_dtype} needs a cast first")
        if weight_grad:
            self.save(x)
        return self.new(rows * out_features, dtype, x.requires_grad or weight_grad or bias_grad)

    def frozen_linear_no_save(self, x: Sym, out_features: int, in_features: int, dtype: str) -> Sym:
        """A 4-bit linear: dequantizes in forward and again in backward; saves no activation."""
        rows = x.numel // in_features
        return self.new(rows * out_features, dtype, x.requires_grad)

    def mul(self, a: Sym, b: Sym, numel: int | None = None) -> Sym:
        """a * b (broadcasting): saves b if a needs grad and a if b needs grad."""
        if a.requires_grad:
            self.save(b)
        if b.requires_grad:
            self.save(a)
        n = numel if numel is not None else max(a.numel, b.numel)
        return self.new(n, promote(a.dtype, b.dtype), a.requires_grad or b.requires_grad)

    def scale(self, x: Sym) -> Sym:
        """x * python scalar: saves nothing."""
        return self.new(x.numel, x.dtype, x.requires_grad)

    def add(self, a: Sym, b: Sym) -> Sym:
        """a + b: saves nothing."""
        return self.new(max(a.numel, b.numel), promote(a.dtype, b.dtype), a.requires_grad or b.requires_grad)

    def unary_save_input(self, x: Sym, dtype: str | None = None) -> Sym:
        """silu, gelu, pow, erf...: saves the input."""
        if x.requires_grad:
            self.save(x)
        return self.new(x.numel, dtype or x.dtype, x.requires_grad)

    def unary_save_output(self, x: Sym) -> Sym:
        """tanh, rsqrt, exp, sigmoid...: saves the result."""
        out = self.new(x.numel, x.dtype, x.requires_grad)
        if x.requires_grad:
            self.save(out)
        return out

    def dropout(self, x: Sym, p: float) -> Sym:
        """Training-mode dropout: identity at p=0 (PEFT uses nn.Identity); else a new tensor + a bool mask."""
        if p <= 0:
            return x
        if x.requires_grad:
            self.save(self.new(x.numel, "int8", False))
        return self.new(x.numel, x.dtype, x.requires_grad)

    def rms_norm(self, x: Sym, tokens: int, hidden: int, weight_dtype: str, weight_grad: bool) -> Sym:
        """HF RMSNorm: h = x.to(fp32); h * rsqrt(mean(h^2) + eps); weight * h.to(input dtype).

        Saves the fp32 input (pow and mul), the fp32 rsqrt (T elements), and the normalized 16-bit tensor
        when the weight is trainable.
        """
        xf = self.to(x, "fp32")
        var = self.unary_save_input(xf)  # pow(2) saves its input
        var = self.new(tokens, "fp32", xf.requires_grad)  # mean over the hidden dim
        r = self.unary_save_output(var)  # rsqrt saves its result
        h = self.mul(xf, r, numel=tokens * hidden)
        hd = self.to(h, x.dtype)
        return self.mul(self.param(hidden, weight_dtype, weight_grad), hd, numel=tokens * hidden)

    def layer_norm(self, x: Sym, tokens: int, hidden: int, weight_grad: bool) -> Sym:
        """native_layer_norm: saves input, mean and rstd (T fp32 each) when anything needs grad."""
        if x.requires_grad or weight_grad:
            self.save(x, self.new(tokens, "fp32", False), self.new(tokens, "fp32", False))
        return self.new(x.numel, x.dtype, x.requires_grad or weight_grad)

    def attention(self, q: Sym, k: Sym, v: Sym, batch: int, heads: int, q_len: int, kv_len: int,
                  eager: bool, repeat_kv_factor: int = 1, out_numel: int = 0) -> Sym:
        """Scaled dot-product attention.

        sdpa (flash / memory-efficient, and PyTorch's CPU flash kernel) saves q, k, v, out and an fp32
        logsumexp of batch*heads*q_len (Dao et al. 2022, arXiv:2205.14135: no s^2 buffer). When K/V are
        repeated for GQA (a mask forces transformers to call ``repeat_kv``), the expanded copies are saved.
        Eager attention materializes scores and probabilities (batch*heads*q_len*kv_len): the softmax output
        is saved (and, for 16-bit models, HF upcasts softmax to fp32 then casts back: both saved).
        """
        any_grad = q.requires_grad or k.requires_grad or v.requires_grad
        if repeat_kv_factor > 1:
            k = self.new(k.numel * repeat_kv_factor, k.dtype, k.requires_grad)
            v = self.new(v.numel * repeat_kv_factor, v.dtype, v.requires_grad)
        out = self.new(out_numel or q.numel, q.dtype, any_grad)
        if not any_grad:
            return out
        if eager:
            probs = batch * heads * q_len * kv_len
            self.save(q, k, v)  # matmul saves both operands
            self.save(self.new(probs, "fp32", True))  # softmax(dtype=fp32) saves its result
            if q.dtype != "fp32":
                self.save(self.new(probs, q.dtype, True))  # probs.to(q.dtype) saved by the second matmul
        else:
            self.save(q, k, v, out, self.new(batch * heads * q_len, "fp32", False))
        return out
