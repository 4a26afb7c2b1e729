"""A chunked linear + cross-entropy loss that never materializes the full-sequence fp32 logits (torch).

transformers computes ``logits = lm_head(h)`` for all ``T = b*s`` tokens (``T x V`` in the compute dtype),
upcasts them to fp32 and runs ``cross_entropy`` (``ForCausalLMLoss``): three to four ``T x V`` buffers live
at once. :class:`ChunkedLinearCrossEntropy` runs over chunks of ``c`` tokens
(:func:`lorabench.memory.loss.chunk_tokens`) and forms each chunk's gradients in the forward (the approach
of Liger-Kernel's fused linear cross-entropy, Hsu et al. 2024, arXiv:2410.10989, Sec. 3.2, "Fused Linear Cross Entropy")::

    z     = float(h_c W^T)                       compute-dtype matmul, fp32 logits (cap * tanh(z / cap) if capped)
    loss += sum_valid(log(sum exp(z - m)) + m - z[target])
    dz    = (softmax(z) - onehot(target)) * valid / n_valid      (in place on z)
    dh_c  = cast(dz) @ W ;  dW += cast(dz)^T @ h_c               (dW only when lm_head trains)

The backward then only scales the stored gradients by the incoming one. The arithmetic is that of
``ForCausalLMLoss`` (labels shifted by one, ``ignore_index`` -100, mean over valid tokens): same loss and
gradients up to fp32 summation order. :func:`install_chunked_loss` plugs it into any transformers causal LM
(the lm_head forward becomes the identity and the model's ``loss_function`` receives the hidden states).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from lorabench.memory.loss import chunk_tokens

IGNORE_INDEX = -100


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on (what ``lm_head`` would run in), else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``mean_valid(cross_entropy(h W^T, targets))`` over chunks; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk: int, softcap: float | None) -> torch.Tensor:
        dtype = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight if weight.dtype == dtype else weight.to(dtype)
            grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
            valid = targets != IGNORE_INDEX
            n_valid = valid.sum().clamp(min=1).float()
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                end = min(start + chunk, hidden.shape[0])
                loss += _chunk(hidden[start:end], w, targets[start:end], valid[start:end], n_valid, softcap,
                               None if grad_h is None else grad_h[start:end], grad_w)
        ctx.grads = (grad_h, grad_w)
        return loss / n_valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h.mul_(grad_out.to(grad_h.dtype))  # in place: no second T x h buffer
        if grad_w is not None:
            grad_w.mul_(grad_out.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None


def _chunk(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor,
           softcap: float | None, grad_h: torch.Tensor | None, grad_w: torch.Tensor | None) -> torch.Tensor:
    """One chunk: returns its summed loss and writes its gradients (see the module docstring)."""
    hc = h if h.dtype == w.dtype else h.to(w.dtype)
    logits = hc @ w.t()
    z = logits.float()  # the same tensor when the compute dtype is fp32
    del logits
    tanh = None
    if softcap:  # Gemma-2: z = cap * tanh(z / cap); dz/dlogits = 1 - tanh^2
        tanh = z.div_(softcap).tanh_()
        z = tanh * softcap
    safe_t = t.clamp(min=0).unsqueeze(1)
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m)
    target = z.gather(1, safe_t)
    z.exp_()
    s = z.sum(dim=1, keepdim=True)
    keep = valid.unsqueeze(1).float()
    loss = ((s.log() - target) * keep).sum()
    z.div_(s)  # softmax
    z.scatter_add_(1, safe_t, -keep)
    z.mul_(keep / n_valid)
    if tanh is not None:
        z.mul_(tanh.square_().neg_().add_(1))  # in place: never a third c x V buffer
        del tanh
    dz = z if z.dtype == w.dtype else z.to(w.dtype)
    del z
    if grad_h is not None:
        grad_h.copy_(dz @ w)
    if grad_w is not None:
        grad_w.addmm_(dz.t().to(grad_w.dtype), hc.to(grad_w.dtype))
    return loss


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          softcap: float | None = None, chunk: int | None = None) -> torch.Tensor:
    """Causal-LM loss of ``hidden`` (b, s, h) under lm_head ``weight`` (V, h) with ``labels`` (b, s).

    Labels are shifted as transformers does (position i predicts label i+1; the last position and labels of
    -100 are ignored); the result is the mean over valid positions, in fp32.
    """
    targets = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if chunk is None:
        chunk = chunk_tokens(flat.shape[0], weight.shape[0])
    return ChunkedLinearCrossEntropy.apply(flat, weight, targets.to(flat.device), int(chunk), softcap)


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside ``model`` (itself, PEFT's base model, DDP's ``.module``, a wrapper's ``.model``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    for module in (base, model, getattr(model, "module", None), getattr(model, "model", None)):
        if module is not None and hasattr(module, "get_output_embeddings") and hasattr(module, "config") \
                and module.get_output_embeddings() is not None:
            return module
    raise TypeError(f"{type(model).__name__} has no language-model head for the chunked loss")


@contextlib.contextmanager
def install_chunked_loss(model: torch.nn.Module) -> Iterator[None]:
    """While active, ``model(input_ids, labels=...)`` computes its loss with :func:`chunked_cross_entropy`.

    The lm_head's forward returns its input (the final hidden states, which the output's ``logits`` then
    holds), the config's logit soft-capping moves into the loss, and the model's ``loss_function`` receives
    the hidden states. An lm_head with a bias is refused.
    """
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise TypeError("the chunked loss supports an lm_head without bias")
    cap = getattr(lm.config, "final_logit_softcapping", None)
    had_loss = "_loss_function" in vars(lm)
    old_loss = vars(lm).get("_loss_function")

    def loss_function(logits: torch.Tensor, labels: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return chunked_cross_entropy(logits, head.weight, labels, softcap=cap)

    head.forward = lambda x: x  # type: ignore[method-assign]
    lm.loss_function = loss_function
    if cap is not None:
        lm.config.final_logit_softcapping = None
    try:
        yield
    finally:
        del head.forward
        if cap is not None:
            lm.config.final_logit_softcapping = cap
        if had_loss:
            lm._loss_function = old_loss
        else:
            vars(lm).pop("_loss_function", None)
