"""bitsandbytes' own 4-bit layers for the PEFT-stack tracer (``trace --stack peft`` on QLoRA).

Building: every linear layer that transformers' bitsandbytes quantizer converts (all but ``lm_head``) becomes a
real ``bnb.nn.Linear4bit`` whose ``Params4bit`` holds a packed uint8 tensor of bitsandbytes' shape
``((out * in + 1) // 2, 1)`` and a ``QuantState`` with the shapes and dtypes ``bnb.functional.quantize_4bit``
gives (``tests/runtime/test_bnb_stack.py`` compares them with a real quantization): the per-block absmax
(fp32; with double quantization uint8, plus an fp32 offset and a nested state of one fp32 absmax per 256
blocks and the 256-entry dynamic code). No value is ever computed: everything sits on meta, then fake.

Running: bitsandbytes' fake kernel of ``gemm_4bit`` allocates only the output (its fused CUDA kernel does that
for small token counts, on some GPU architectures); for the token counts of training batches (M > 1536 on
every CUDA GPU, and below that on sm90 for most shapes) the CUDA dispatch takes ``_dequant_linear_fallback``:
the nested absmax dequantized (fp32), plus the offset, the weight dequantized to the compute dtype, then
``F.linear``. :func:`matmul_4bit_as_on_cuda` swaps ``bnb.matmul_4bit`` for the same function with that
fallback in ``MatMul4Bit``'s forward (bitsandbytes' CPU-and-default kernel, the same ops, each with a fake
kernel). The backward is bitsandbytes' own (``MatMul4Bit.backward``: saves only the packed weight and
re-dequantizes it). Source: docs/SOURCES.md#bnb-matmul4bit.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

import torch
from torch import nn

NF4_BLOCKSIZE = 64
"""bitsandbytes' 4-bit block size (``Linear4bit``'s default ``blocksize``)."""
NESTED_BLOCKSIZE = 256
"""Block size of the double quantization of the absmax (``quantize_4bit(compress_statistics=True)``)."""


def fake_quant_state(out_features: int, in_features: int, *, double_quant: bool, dtype: torch.dtype,
                     device: str = "meta") -> Any:
    """A ``QuantState`` with the tensors ``quantize_4bit`` makes for an (out, in) weight, on ``device``."""
    from bitsandbytes.functional import QuantState

    blocks = -(-out_features * in_features // NF4_BLOCKSIZE)
    code = torch.empty(16, dtype=torch.float32, device=device)
    if not double_quant:
        return QuantState(absmax=torch.empty(blocks, dtype=torch.float32, device=device),
                          shape=torch.Size([out_features, in_features]), code=code, blocksize=NF4_BLOCKSIZE,
                          quant_type="nf4", dtype=dtype)
    state2 = QuantState(absmax=torch.empty(-(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32, device=device),
                        code=torch.empty(256, dtype=torch.float32, device=device), blocksize=NESTED_BLOCKSIZE,
                        dtype=torch.float32)
    return QuantState(absmax=torch.empty(blocks, dtype=torch.uint8, device=device),
                      shape=torch.Size([out_features, in_features]), code=code, blocksize=NF4_BLOCKSIZE,
                      quant_type="nf4", dtype=dtype, offset=torch.empty((), dtype=torch.float32, device=device),
                      state2=state2)


def to_linear4bit(linear: nn.Linear, *, double_quant: bool, compute_dtype: torch.dtype,
                  weight_dtype: torch.dtype) -> nn.Module:
    """A meta ``bnb.nn.Linear4bit`` in place of ``linear`` (bias kept in its dtype), already "quantized"."""
    from lorabench.quant.bnb_backend import import_bitsandbytes

    bnb = import_bitsandbytes()

    out_f, in_f = linear.out_features, linear.in_features
    with torch.device("meta"):
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=linear.bias is not None, compute_dtype=compute_dtype,
                                  quant_type="nf4", compress_statistics=double_quant, quant_storage=torch.uint8)
    packed = torch.empty(((out_f * in_f + 1) // 2, 1), dtype=torch.uint8, device="meta")
    state = fake_quant_state(out_f, in_f, double_quant=double_quant, dtype=weight_dtype)
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=NF4_BLOCKSIZE,
                                     compress_statistics=double_quant, quant_type="nf4",
                                     quant_storage=torch.uint8, module=layer, bnb_quantized=True)
    if linear.bias is not None:
        layer.bias = nn.Parameter(torch.empty_like(linear.bias, device="meta"), requires_grad=False)
    return layer


def quantize_linears(model: nn.Module, *, double_quant: bool, compute_dtype: torch.dtype,
                     weight_dtype: torch.dtype, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` but ``skip`` by a meta ``Linear4bit`` (as transformers' bnb quantizer does);
    marks the model ``is_loaded_in_4bit`` as ``from_pretrained`` does. Returns the number replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name not in skip:
                setattr(module, child_name, to_linear4bit(child, double_quant=double_quant,
                                                          compute_dtype=compute_dtype, weight_dtype=weight_dtype))
                replaced += 1
    model.is_loaded_in_4bit = True
    return replaced


def quant_states(model: nn.Module) -> dict[nn.Module, Any]:
    """Each 4-bit layer's ``QuantState`` (to re-attach after the weights are swapped for fake tensors)."""
    return {m: m.weight.quant_state for m in model.modules() if getattr(m.weight if hasattr(m, "weight") else None,
                                                                         "quant_state", None) is not None}


def reattach_quant_states(states: dict[nn.Module, Any], convert: Any) -> None:
    """Put each layer's ``QuantState`` (tensors passed through ``convert``) back on its (now fake) weight."""
    for module, state in states.items():
        top = state
        while state is not None:
            for name, value in list(vars(state).items()):
                if isinstance(value, torch.Tensor):
                    setattr(state, name, convert(value))
            state = getattr(state, "state2", None)
        module.weight.quant_state = top


def _dequant_linear(A: torch.Tensor, B: torch.Tensor, quant_state: Any, bias: Any) -> torch.Tensor:
    """The CUDA dispatch's ``_dequant_linear_fallback`` (bitsandbytes' default kernel: the same ops)."""
    from bitsandbytes.backends.default.ops import _gemm_4bit_default_impl

    nested = quant_state.nested
    return _gemm_4bit_default_impl(
        A, B.view(-1, 1), quant_state.shape, quant_state.state2.absmax if nested else quant_state.absmax,
        quant_state.blocksize, quant_state.quant_type, bias=bias,
        absmax_8bit=quant_state.absmax if nested else None,
        absmax_code=quant_state.state2.code if nested else None,
        absmax_offset=quant_state.offset if nested else None)


def _unfused_matmul4bit() -> type:
    from bitsandbytes.autograd._functions import MatMul4Bit

    class UnfusedMatMul4Bit(MatMul4Bit):
        """``MatMul4Bit`` whose forward runs the CUDA dispatch's dequantize + linear, not the fused GEMM
        (the rest as bitsandbytes' forward: only the packed weight saved; backward inherited)."""

        @staticmethod
        def forward(ctx: Any, A: torch.Tensor, B: torch.Tensor, out: Any = None, bias: Any = None,
                    quant_state: Any = None) -> torch.Tensor:
            ctx.is_empty = False
            B = B.view(-1, 1)
            output = _dequant_linear(A, B, quant_state, bias)
            ctx.state = quant_state
            ctx.dtype_A, ctx.dtype_B, ctx.dtype_bias = A.dtype, B.dtype, None if bias is None else bias.dtype
            ctx.tensors = (None, B) if any(ctx.needs_input_grad[:2]) else (None, None)
            return output

    return UnfusedMatMul4Bit


@contextlib.contextmanager
def matmul_4bit_as_on_cuda() -> Iterator[None]:
    """``bnb.matmul_4bit`` as CUDA runs it for training inputs (see the module docstring); a no-op unless
    bitsandbytes is imported (its layers are then in use)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        yield
        return
    original = bnb.matmul_4bit
    unfused = _unfused_matmul4bit()

    def matmul_4bit(A: torch.Tensor, B: torch.Tensor, quant_state: Any, out: Any = None, bias: Any = None) -> Any:
        needs_grad = torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad))
        if A.numel() == 0 or out is not None or getattr(quant_state, "packing_format_for_cpu", False):
            return original(A, B, quant_state, out=out, bias=bias)
        return unfused.apply(A, B, out, bias, quant_state) if needs_grad else _dequant_linear(A, B, quant_state, bias)

    bnb.matmul_4bit = matmul_4bit
    try:
        yield
    finally:
        bnb.matmul_4bit = original
