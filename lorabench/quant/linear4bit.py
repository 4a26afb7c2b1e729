"""A frozen NF4 linear layer (QLoRA's base layer) whose backward re-dequantizes the weight.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314, Sec. 3, Eq. 5-6) computes
``Y = X @ doubleDequant(c1, c2, W_nf4)^T (+ b)`` in the 16-bit compute dtype and trains only the
adapters: the frozen base weight needs no gradient, and ``dL/dX = dL/dY @ W`` is formed by
dequantizing the weight AGAIN in backward. So nothing of weight size is kept for backward: the
autograd Function holds only a reference to the packed ``NF4Tensor`` (like bitsandbytes'
``MatMul4Bit``, which keeps ``ctx.state``/``ctx.tensors`` references rather than saved tensors, so
``saved_tensors_hooks`` such as CPU offloading never copy the frozen weight).

Parameters vs buffers (what ``model.parameters()`` counts): the packed codes and quantization
constants are registered as non-persistent BUFFERS (``weight_packed``, ``weight_absmax``,
``weight_nested_absmax``, ``weight_offset``), never as Parameters, so ``parameters()`` holds only the
optional frozen bias, optimizers and "cast every parameter" helpers can never touch quantized data,
and trainable-parameter counts are exact. ``module.weight`` is the ``NF4Tensor`` view of those buffers:
``weight.shape == (out_features, in_features)``, ``weight.numel()`` the logical parameter count
(``quantized_numel`` sums it over a model), ``weight.requires_grad`` is False and ``weight.nbytes``
its exact storage. ``module.to(dtype)`` / ``.half()`` never cast the quantization constants (only
their device changes). ``state_dict()`` uses bitsandbytes' key names (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``) so checkpoints load either way.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.quant.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from lorabench.quant.sizes import NF4_BLOCKSIZE
from lorabench.quant.triton_nf4 import dequantize_op, triton_available

DEQUANT_BACKENDS = ("auto", "torch", "triton")
"""How the 4-bit layer dequantizes: ``torch`` (chunked pure-torch ops, any device), ``triton`` (one Triton
kernel through ``lorabench::nf4_dequantize``), ``auto`` (triton on CUDA when triton imports, else torch)."""

_EMULATING_CUDA = [False]


@contextlib.contextmanager
def dequant_as_on_cuda() -> Iterator[None]:
    """While active, ``auto`` resolves as on a CUDA device with triton (the tracer models a CUDA run)."""
    before = _EMULATING_CUDA[0]
    _EMULATING_CUDA[0] = True
    try:
        yield
    finally:
        _EMULATING_CUDA[0] = before


def resolve_dequant(backend: str, device: torch.device) -> str:
    """``torch`` or ``triton`` for ``backend`` on ``device`` (see :data:`DEQUANT_BACKENDS`)."""
    if backend != "auto":
        return backend
    on_cuda = device.type == "cuda" or _EMULATING_CUDA[0]
    return "triton" if on_cuda and triton_available() else "torch"


def dequantize_with(weight: NF4Tensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """``weight`` dequantized to ``dtype`` by ``backend`` (same values either way)."""
    if resolve_dequant(backend, weight.device) == "triton":
        return dequantize_op(weight, dtype)
    return dequantize_nf4(weight, dtype)


_BUFFERS = {"packed": "weight_packed", "absmax": "weight_absmax",
            "nested_absmax": "weight_nested_absmax", "offset": "weight_offset"}  # fmt: skip


class NF4Matmul(torch.autograd.Function):
    """``y = x @ dequant(W)^T + b``; backward re-dequantizes ``W`` for ``dL/dx`` (no weight grad)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, weight: NF4Tensor, dequant: str = "torch"
    ) -> torch.Tensor:
        ctx.weight = weight  # a reference to the packed state only; no tensor is saved for backward
        ctx.dequant = dequant
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize_with(weight, x.dtype, dequant), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_with(ctx.weight, grad_out.dtype, ctx.dequant)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None


class Linear4bit(nn.Module):
    """Frozen NF4 linear layer: ``y = x @ W^T + b`` with ``W`` dequantized to ``compute_dtype``.

    The input is cast to ``compute_dtype`` and the output back to the input's dtype (bitsandbytes'
    ``Linear4bit`` convention). Build one with ``from_linear``.

    Args:
        weight: The quantized ``(out_features, in_features)`` weight.
        bias: Optional bias; stored frozen in ``compute_dtype``.
        compute_dtype: Dtype of the dequantized weight and of the matmul (bf16 by default).
        dequant: ``auto``, ``torch`` or ``triton`` (:data:`DEQUANT_BACKENDS`).
    """

    weight_packed: torch.Tensor
    weight_absmax: torch.Tensor

    def __init__(
        self,
        weight: NF4Tensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
        dequant: str = "auto",
    ) -> None:
        super().__init__()
        if dequant not in DEQUANT_BACKENDS:
            raise ValueError(f"dequant must be one of {DEQUANT_BACKENDS}, got {dequant!r}")
        self.dequant = dequant
        if weight.ndim != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.compute_dtype = compute_dtype
        self._set_weight(weight)
        b = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.register_parameter("bias", b)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        blocksize: int = NF4_BLOCKSIZE,
        dequant: str = "auto",
    ) -> Linear4bit:
        """Quantize an ``nn.Linear`` (on its own device) into a ``Linear4bit``."""
        weight = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(weight, linear.bias, compute_dtype=compute_dtype, dequant=dequant)

    def _set_weight(self, weight: NF4Tensor) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != "
                             f"{(self.out_features, self.in_features)}")  # fmt: skip
        for field, name in _BUFFERS.items():
            self.register_buffer(name, getattr(weight, field), persistent=False)
        self._weight_meta = {"shape": weight.shape, "dtype": weight.dtype,
                             "blocksize": weight.blocksize, "dq_blocksize": weight.dq_blocksize}  # fmt: skip

    @property
    def weight(self) -> NF4Tensor:
        """The quantized weight as an ``NF4Tensor`` over this module's current buffers."""
        tensors = {field: getattr(self, name) for field, name in _BUFFERS.items()}
        return NF4Tensor(**tensors, **self._weight_meta)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full ``(out_features, in_features)`` weight in ``dtype`` (default ``compute_dtype``)."""
        return dequantize_with(self.weight, self.compute_dtype if dtype is None else dtype, self.dequant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != self.compute_dtype:
            bias = bias.to(self.compute_dtype)
        out = NF4Matmul.apply(x.to(self.compute_dtype), bias, self.weight, self.dequant)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        w = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}, dequant={self.dequant}, "
                f"blocksize={w.blocksize}, double_quant={w.double_quant}")  # fmt: skip

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Linear4bit:
        # Quantization constants follow device moves but never dtype casts (fp32 absmax must stay fp32).
        names = [n for n in _BUFFERS.values() if self._buffers.get(n) is not None]
        held = {n: self._buffers.pop(n) for n in names}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in held.items():
                new = fn(t)  # a move or ``to_empty`` is kept; a dtype cast is dropped, t only moved
                self._buffers[name] = new if new.dtype == t.dtype else t.to(new.device)
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for key, value in self.weight.to_state_dict(prefix + "weight").items():
            destination[key] = value if keep_vars else value.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip
        unexpected_keys[:] = [k for k in unexpected_keys if k != key and not k.startswith(key + ".")]
        if key not in state_dict:
            missing_keys.append(key)
            return
        try:
            loaded = NF4Tensor.from_state_dict(state_dict, prefix=key)
            self._set_weight(loaded.to(self.weight_packed.device))
        except (KeyError, ValueError) as err:
            error_msgs.append(f"{key}: {err}")


def quantized_numel(model: nn.Module) -> int:
    """Logical parameter count held by ``Linear4bit`` layers (not in ``model.parameters()``)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, Linear4bit))

