"""A symbolic autograd: what a forward pass keeps for backward, and the peak while backward runs (stdlib only).

Activation memory is the sum of the distinct tensors autograd saves. Closed forms such as Korthikanti et
al. 2022 (arXiv:2205.05198, Sec. 4.1: ``sbh(34 + 5as/h)`` for GPT with dropout) fix one precision, one
activation function and one set of trainable weights. Fine-tuning changes all three: a frozen linear saves
nothing of its input, an fp32 LoRA adapter saves an fp32 copy of it, autocast saves 16-bit weight copies.
So the planner runs each layer's ops on symbolic tensors, applying each op's save rule from PyTorch's
``tools/autograd/derivatives.yaml`` (``mm``: self saved iff mat2 needs grad; ``pow``: self; ``rsqrt``/``tanh``:
result; ``silu``/``gelu``: self; flash/efficient attention: q, k, v, out, logsumexp), counting each tensor
once however many ops save it, exactly like storage-level tracking.

The ops are also recorded on a tape, so :meth:`Graph.backward_peak` can replay backward in reverse:
each node allocates gradients for its inputs (in the inputs' dtypes; ``add`` passes its gradient through),
accumulates gradients of tensors used twice, then frees its output's gradient and the saved tensors no
later node needs (autograd releases saved variables once their node has run).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from lorabench.quant.sizes import DEQUANT_CHUNK_ELEMS, NF4_BLOCKSIZE
from lorabench.specs import DTYPE_BYTES

_ids = itertools.count()


@dataclass(frozen=True)
class Sym:
    """A symbolic tensor: element count, dtype name, whether it requires grad, whether it is a parameter."""

    numel: int
    dtype: str
    requires_grad: bool
    is_param: bool = False
    uid: int = field(default_factory=lambda: next(_ids))

    @property
    def nbytes(self) -> int:
        return int(self.numel * DTYPE_BYTES[self.dtype])


@dataclass(frozen=True)
class Op:
    """One forward op on the tape: differentiable inputs, output, the tensors it saved."""

    inputs: tuple[Sym, ...]
    output: Sym
    saved: tuple[int, ...]
    passthrough: bool = False
    transient_bytes: int = 0
    param_grad_bytes: int = 0




def dequant_scratch_bytes(numel: int) -> int:
    """Scratch of lorabench's NF4 dequantization besides the output weight: the fp32 absmax
    (4 bytes per 64-block) and, per chunk of 4M elements, int32 byte indices (2 B/element) and fp32 codebook
    values (4 B/element); a chunk's temporaries are still alive when the next chunk's are made (two chunks).
    """
    chunks_alive = 2 if numel > DEQUANT_CHUNK_ELEMS else 1
    return int(4 * -(-numel // NF4_BLOCKSIZE) + chunks_alive * 6 * min(numel, DEQUANT_CHUNK_ELEMS))


def promote(a: str, b: str) -> str:
    """Type promotion of two float dtypes (fp32 wins; bf16 with fp16 gives fp32)."""
    return a if a == b else "fp32"


@dataclass
class Graph:
    """Collects saved tensors and the tape. ``autocast`` is the 16-bit dtype matmuls run in, or None."""

    autocast: str | None = None
    saved: dict[int, int] = field(default_factory=dict)
    tape: list[Op] = field(default_factory=list)
    forward_peak: int = 0
    """Largest saved-so-far + live-temporaries sum seen during the forward (see :meth:`record`)."""
    _pending: list[int] = field(default_factory=list)
    _held: dict[int, int] = field(default_factory=dict)

    # ---- bookkeeping ----
    def new(self, numel: int, dtype: str, requires_grad: bool) -> Sym:
        return Sym(int(numel), dtype, requires_grad)

    def param(self, numel: int, dtype: str, requires_grad: bool) -> Sym:
        """A parameter: saving it costs no new memory and its gradient is not an activation."""
        return Sym(int(numel), dtype, requires_grad, is_param=True)

    def save(self, *tensors: Sym) -> None:
        for t in tensors:
            if not t.is_param:
                self.saved[t.uid] = t.nbytes
                self._pending.append(t.uid)

    def hold(self, t: Sym) -> None:
        """Mark a tensor the program keeps in a variable (a residual, LoRA's base output) as live."""
        self._held[t.uid] = t.nbytes

    def drop(self, t: Sym) -> None:
        self._held.pop(t.uid, None)

    def record(self, inputs: tuple[Sym, ...], output: Sym, passthrough: bool = False, transient_bytes: int = 0,
               param_grad_bytes: int = 0, forward_transient_bytes: int = 0) -> Sym:
        """Close the current op: its saves so far belong to it.

        While the op runs, its inputs and output are alive besides the saved tensors and the held
        variables; that sum updates :attr:`forward_peak`.

        Args:
            transient_bytes: scratch its backward allocates and frees (e.g. grad * x before the sum that
                reduces it to a broadcast parameter's shape).
            param_grad_bytes: parameter gradients its backward creates (they persist).
            forward_transient_bytes: scratch the forward op itself holds while it runs.
        """
        live = {t.uid: t.nbytes for t in (*inputs, output) if not t.is_param}
        live.update(self._held)
        transient = sum(b for uid, b in live.items() if uid not in self.saved)
        self.forward_peak = max(self.forward_peak, self.saved_bytes + transient + forward_transient_bytes)
        grads = tuple({t.uid: t for t in inputs if t.requires_grad and not t.is_param}.values())
        self.tape.append(Op(grads, output, tuple(self._pending), passthrough, transient_bytes, param_grad_bytes))
        self._pending = []
        return output

    @property
    def saved_bytes(self) -> int:
        return sum(self.saved.values())

    # ---- ops (save rules from derivatives.yaml) ----
    def to(self, x: Sym, dtype: str) -> Sym:
        """``x.to(dtype)``: a no-op when the dtype matches, else a copy; saves nothing."""
        if x.dtype == dtype:
            return x
        return self.record((x,), self.new(x.numel, dtype, x.requires_grad))

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
        out = self.new(rows * out_features, dtype, x.requires_grad or weight_grad or bias_grad)
        grad_bytes = out_features * in_features * DTYPE_BYTES[weight_dtype] if weight_grad else 0
        return self.record((x,), out, param_grad_bytes=int(grad_bytes))

    def frozen_linear_no_save(self, x: Sym, out_features: int, in_features: int, dtype: str,
                              torch_dequant: bool = True) -> Sym:
        """A 4-bit linear: saves no activation, but dequantizes the full weight (out x in, compute dtype)
        for the matmul in forward and again in backward (QLoRA's MatMul4Bit). ``torch_dequant``: the pure-torch
        dequantization's scratch comes on top (:func:`dequant_scratch_bytes`); the Triton kernel has none."""
        rows = x.numel // in_features
        scratch = dequant_scratch_bytes(out_features * in_features) if torch_dequant else 0
        weight = int(out_features * in_features * DTYPE_BYTES[dtype]) + scratch
        return self.record((x,), self.new(rows * out_features, dtype, x.requires_grad), transient_bytes=weight,
                           forward_transient_bytes=weight)

    def mul(self, a: Sym, b: Sym, numel: int | None = None) -> Sym:
        """a * b (broadcasting): saves b if a needs grad and a if b needs grad."""
        if a.requires_grad:
            self.save(b)
        if b.requires_grad:
            self.save(a)
        n = numel if numel is not None else max(a.numel, b.numel)
        out = self.new(n, promote(a.dtype, b.dtype), a.requires_grad or b.requires_grad)
        # A broadcast trainable parameter's gradient is (grad * other) summed down to its shape.
        scratch = sum(out.nbytes for t in (a, b) if t.is_param and t.requires_grad and t.numel < n)
        grads = sum(t.nbytes for t in (a, b) if t.is_param and t.requires_grad)
        return self.record((a, b), out, transient_bytes=scratch, param_grad_bytes=grads)

    def scale(self, x: Sym) -> Sym:
        """x * python scalar: saves nothing."""
        return self.record((x,), self.new(x.numel, x.dtype, x.requires_grad))

    def add(self, a: Sym, b: Sym) -> Sym:
        """a + b: saves nothing; backward hands the same gradient to both inputs."""
        out = self.new(max(a.numel, b.numel), promote(a.dtype, b.dtype), a.requires_grad or b.requires_grad)
        return self.record((a, b), out, passthrough=True)

    def elementwise(self, x: Sym, numel: int | None = None, dtype: str | None = None) -> Sym:
        """An op that saves nothing big (RoPE's q*cos + rotate(q)*sin, reductions, slicing)."""
        return self.record((x,), self.new(numel if numel is not None else x.numel, dtype or x.dtype, x.requires_grad))

    def cat(self, a: Sym, b: Sym) -> Sym:
        """torch.cat([a, b]) (DynamicCache.update): saves nothing; backward slices the gradient."""
        return self.record((a, b), self.new(a.numel + b.numel, a.dtype, a.requires_grad or b.requires_grad))

    def unary_save_input(self, x: Sym, dtype: str | None = None) -> Sym:
        """silu, gelu, pow, erf...: saves the input."""
        if x.requires_grad:
            self.save(x)
        return self.record((x,), self.new(x.numel, dtype or x.dtype, x.requires_grad))

    def unary_save_output(self, x: Sym) -> Sym:
        """tanh, rsqrt, exp, sigmoid...: saves the result."""
        out = self.new(x.numel, x.dtype, x.requires_grad)
        if x.requires_grad:
            self.save(out)
        return self.record((x,), out)

    def dropout(self, x: Sym, p: float) -> Sym:
        """Training-mode dropout: identity at p=0 (PEFT uses nn.Identity); else a new tensor + a bool mask."""
        if p <= 0:
            return x
        if x.requires_grad:
            self.save(self.new(x.numel, "int8", False))
        return self.record((x,), self.new(x.numel, x.dtype, x.requires_grad))

    def rms_norm(self, x: Sym, tokens: int, hidden: int, weight_dtype: str, weight_grad: bool) -> Sym:
        """HF RMSNorm: h = x.to(fp32); h * rsqrt(mean(h^2) + eps); weight * h.to(input dtype).

        Saves the fp32 input (pow and mul), the fp32 rsqrt (T elements), and the normalized 16-bit tensor
        when the weight is trainable.
        """
        xf = self.to(x, "fp32")
        sq = self.unary_save_input(xf)  # pow(2) saves its input
        var = self.elementwise(sq, numel=tokens)  # mean over the hidden dim
        r = self.unary_save_output(var)  # rsqrt saves its result
        h = self.mul(xf, r, numel=tokens * hidden)
        hd = self.to(h, x.dtype)
        return self.mul(self.param(hidden, weight_dtype, weight_grad), hd, numel=tokens * hidden)

    def layer_norm(self, x: Sym, tokens: int, hidden: int, weight_grad: bool) -> Sym:
        """native_layer_norm: saves input, mean and rstd (T values each) when anything needs grad."""
        if x.requires_grad or weight_grad:
            self.save(x, self.new(tokens, x.dtype, False), self.new(tokens, x.dtype, False))
        return self.record((x,), self.new(x.numel, x.dtype, x.requires_grad or weight_grad))

    def attention(self, q: Sym, k: Sym, v: Sym, batch: int, heads: int, q_len: int, kv_len: int,
                  eager: bool, repeat_kv_factor: int = 1, out_numel: int = 0, masked: bool = False,
                  softcap: bool = False) -> Sym:
        """Scaled dot-product attention.

        sdpa (flash / memory-efficient, and PyTorch's CPU flash kernel) saves q, k, v, out and an fp32
        logsumexp of batch*heads*q_len (Dao et al. 2022, arXiv:2205.14135: no s^2 buffer). When K/V are
        repeated for GQA (a mask forces transformers to call ``repeat_kv``), the expanded copies are saved.
        Eager attention materializes scores and probabilities (batch*heads*q_len*kv_len): the fp32 softmax
        output is saved, and its 16-bit cast is saved by the second matmul. With soft-capped scores (Gemma-2,
        ``softcap``) tanh saves its output too, in the scores' dtype. Its backward holds softmax's fp32 input
        gradient and result at once (checked against eager traces).
        """
        if repeat_kv_factor > 1:
            k = self.elementwise(k, numel=k.numel * repeat_kv_factor)
            v = self.elementwise(v, numel=v.numel * repeat_kv_factor)
        any_grad = q.requires_grad or k.requires_grad or v.requires_grad
        out = self.new(out_numel or q.numel, q.dtype, any_grad)
        if any_grad and eager:
            probs = batch * heads * q_len * kv_len
            self.save(q, k, v)  # the two matmuls save their operands
            self.save(self.new(probs, "fp32", True))  # softmax(dtype=fp32) saves its result
            if softcap:
                self.save(self.new(probs, q.dtype, True))  # cap * tanh(scores / cap): tanh saves its result
            if q.dtype != "fp32":
                self.save(self.new(probs, q.dtype, True))  # probs.to(q.dtype), saved by the second matmul
            # Backward: softmax's fp32 input gradient and its result are alive together (2 x 4 B a score), once
            # the 16-bit copy the second matmul saved is freed.
            return self.record((q, k, v), out, transient_bytes=int(probs * (8 - (DTYPE_BYTES[q.dtype] if q.dtype != "fp32" else 0))))
        elif any_grad:
            self.save(q, k, v, out, self.new(batch * heads * q_len, "fp32", False))
            if masked:  # each layer turns the boolean mask into an additive one (b x 1 x q x kv), saved by sdpa
                self.save(self.new(batch * q_len * kv_len, q.dtype, False))
        return self.record((q, k, v), out)

    # ---- backward replay ----
    def backward_peak(self, output: Sym) -> tuple[int, int]:
        """(peak bytes, parameter-gradient bytes at that moment) while backward runs through the tape,
        starting from ``output``'s gradient. The peak counts saved tensors still alive, live activation
        gradients, backward scratch and the parameter gradients created so far.
        """
        refs: dict[int, int] = {}
        for op in self.tape:
            for uid in op.saved:
                refs[uid] = refs.get(uid, 0) + 1
        storages: dict[int, list[int]] = {}  # storage id -> [bytes, refcount]
        grads: dict[int, int] = {}  # tensor uid -> storage id
        live = self.saved_bytes

        def alloc(nbytes: int) -> int:
            nonlocal live
            sid = next(_ids)
            storages[sid] = [nbytes, 0]
            live += nbytes
            return sid

        def release(sid: int) -> None:
            nonlocal live
            storages[sid][1] -= 1
            if storages[sid][1] <= 0:
                live -= storages.pop(sid)[0]

        def give(t: Sym, sid: int) -> None:
            nonlocal peak
            storages[sid][1] += 1
            if t.uid in grads:  # a tensor used twice: its gradients are summed into a new tensor
                total = alloc(t.nbytes)
                peak = max(peak, live)
                storages[total][1] += 1
                release(grads[t.uid])
                release(sid)
                sid = total
            grads[t.uid] = sid

        first = alloc(output.nbytes)
        storages[first][1] = 1
        grads[output.uid] = first
        peak = live
        param_grads = peak_param_grads = 0
        for op in reversed(self.tape):
            sid = grads.pop(op.output.uid, None)
            if sid is not None:
                for t in op.inputs:
                    same = op.passthrough and t.dtype == op.output.dtype and t.numel == op.output.numel
                    give(t, sid if same else alloc(t.nbytes))
                param_grads += op.param_grad_bytes
                live += op.param_grad_bytes
                if live + op.transient_bytes > peak:
                    peak, peak_param_grads = live + op.transient_bytes, param_grads
                release(sid)
            for uid in op.saved:
                refs[uid] -= 1
                if refs[uid] == 0:
                    live -= self.saved[uid]
        return peak, peak_param_grads
