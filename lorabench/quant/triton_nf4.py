"""A Triton kernel for NF4 dequantization (with and without double quantization) to bf16/fp16/fp32.

One pass over the packed weight: each program reads ``BLOCK_BYTES`` bytes of packed codes (two 4-bit codes
per byte, first element in the high nibble), the block's absmax (fp32, or with double quantization its uint8
code, the nested fp32 absmax of its 256-block and the fp32 offset), and writes ``2 * BLOCK_BYTES`` outputs::

    absmax_b = dyn[a_b] * nested_absmax[b // dq_blocksize] + offset     (double quant; fp32, two roundings)
    w_i      = NF4_CODE[q_i] * absmax[i // blocksize]                   (fp32, rounded once to the output dtype)

the same fp32 arithmetic as :func:`lorabench.quant.nf4.dequantize_nf4` (and bitsandbytes' ``dequantize_4bit``),
so the output is bit-identical on the GPU. Contraction of the double-quant multiply-add into one fused FMA is
disabled at launch (``enable_fp_fusion=False``) because it would round once instead of twice.

Traffic per element: 0.5 B of codes + ``1/blocksize`` B of absmax codes read, ``itemsize`` B written (QLoRA,
Dettmers et al. 2023, arXiv:2305.14314, Sec. 3: 4.127 bits per parameter with double quantization); the
kernel allocates nothing but its output, so its scratch is zero (the planner's ``triton`` dequant term).

On the CPU, ``TRITON_INTERPRET=1`` (set before this module is imported) runs the same kernel on CPU tensors
through Triton's interpreter; its float32 -> bfloat16 cast truncates where the GPU rounds to nearest.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from lorabench.quant.nf4 import NF4Tensor, nf4_code, shared_dynamic_map

BLOCK_BYTES = 1024
"""Packed bytes per Triton program (2048 output elements): large enough to stream, small enough for
registers. Must be a power of two."""

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``triton`` imports (it ships with torch's Linux CUDA wheels; on the CPU it is optional)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_run_on(device: torch.device) -> bool:
    """Whether the kernel can run on tensors of ``device``: CUDA with triton, or the CPU under the interpreter."""
    if not triton_available():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    """The jitted kernel (built on first use, so that importing this module never needs triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequantize_kernel(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, out_ptr,
                              n_elements, n_bytes, HALF_BLOCK: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr,
                              DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        byte = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = byte < n_bytes
        packed = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (packed >> 4))
        lo = tl.load(code_ptr + (packed & 15))
        block = byte // HALF_BLOCK  # blocksize is even: both codes of a byte share one block
        if DOUBLE_QUANT:
            a = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
            nested = tl.load(nested_ptr + block // DQ_BLOCKSIZE, mask=in_range, other=0.0)
            scale = tl.load(dyn_ptr + a) * nested
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
        values = tl.interleave(hi * scale, lo * scale)  # element 2j (high nibble), then 2j + 1
        elem = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + elem, values.to(out_ptr.dtype.element_ty), mask=elem < n_elements)

    return nf4_dequantize_kernel


def dequantize_nf4_triton(q: NF4Tensor, dtype: torch.dtype | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize ``q`` with the Triton kernel; same result as ``dequantize_nf4(q, dtype)``.

    Args:
        q: the quantized weight (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
        dtype: bf16, fp16 or fp32 (default: ``q.dtype``).
        out: optional contiguous output of ``q.numel()`` elements of ``dtype`` to write into.

    Raises:
        RuntimeError: triton missing, or CPU tensors without the interpreter.
        ValueError: an unsupported output dtype or ``out``.
    """
    dtype = q.dtype if dtype is None else dtype
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"the Triton NF4 kernel writes bf16, fp16 or fp32, not {dtype}")
    if not can_run_on(q.device):
        raise RuntimeError(f"the Triton NF4 kernel cannot run on {q.device}: it needs CUDA and triton "
                           "(or TRITON_INTERPRET=1 on the CPU)")
    n = q.numel()
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    elif out.dtype != dtype or out.numel() != n or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor of q.numel() elements of the requested dtype")
    code, dyn = nf4_code(q.device), shared_dynamic_map(q.device)
    nested = q.nested_absmax if q.double_quant else q.absmax  # unused pointers when not double quant
    offset = q.offset if q.double_quant else q.absmax
    n_bytes = q.packed.numel()
    grid = (-(-n_bytes // BLOCK_BYTES),)
    _kernel()[grid](q.packed, q.absmax, nested, offset, code, dyn, out, n, n_bytes,
                    HALF_BLOCK=q.blocksize // 2, DQ_BLOCKSIZE=q.dq_blocksize, DOUBLE_QUANT=q.double_quant,
                    BLOCK=BLOCK_BYTES, enable_fp_fusion=False)
    return out


# ------------------------------------------------------------------ the dispatcher-level op


@torch.library.custom_op("lorabench::nf4_dequantize", mutates_args=())
def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                   offset: torch.Tensor | None, shape: list[int], blocksize: int, dq_blocksize: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """``lorabench::nf4_dequantize``: the Triton kernel as one dispatcher op (output: ``shape`` in ``dtype``).

    On CUDA it runs :func:`dequantize_nf4_triton`; on the CPU it computes the same values with
    :func:`lorabench.quant.nf4.dequantize_nf4` (never the interpreter, which keeps a reference to the last
    launch's output alive). Its fake kernel only allocates the output, which is all the Triton kernel
    allocates: a trace of the Triton path (fake or real CPU tensors) therefore sees exactly what a CUDA run
    allocates (dispatch modes see the op, not what it runs inside).
    """
    q = NF4Tensor(packed, absmax, torch.Size(shape), dtype, blocksize, nested_absmax=nested_absmax,
                  offset=offset, dq_blocksize=dq_blocksize)
    if packed.device.type == "cuda" and can_run_on(packed.device):
        return dequantize_nf4_triton(q, dtype)
    from lorabench.quant.nf4 import dequantize_nf4

    return dequantize_nf4(q, dtype)


@nf4_dequantize.register_fake
def _nf4_dequantize_fake(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                         offset: torch.Tensor | None, shape: list[int], blocksize: int, dq_blocksize: int,
                         dtype: torch.dtype) -> torch.Tensor:
    return packed.new_empty(shape, dtype=dtype)


def dequantize_op(q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q`` dequantized to ``dtype`` through ``lorabench::nf4_dequantize``."""
    return nf4_dequantize(q.packed, q.absmax, q.nested_absmax, q.offset, list(q.shape), q.blocksize,
                          q.dq_blocksize, dtype)
