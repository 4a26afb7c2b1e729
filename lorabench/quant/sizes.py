"""Exact storage bytes of an NF4-quantized weight (stdlib only, never imports torch).

The memory planner calls these functions, and ``lorabench.quant.nf4.NF4Tensor.nbytes`` returns the
same number for a real quantized tensor (tested to the byte), so predicted and allocated bytes for
quantized weights cannot drift apart.

Layout of one quantized weight of ``numel`` elements (QLoRA, Dettmers et al. 2023, arXiv:2305.14314,
Sec. 3 "Double Quantization"; bitsandbytes ``functional.quantize_4bit``)::

    n_blocks    = ceil(numel / blocksize)                      # blocksize = 64
    packed      = ceil(numel / 2)            bytes, uint8      # two 4-bit codes per byte
    # without double quantization
    absmax      = 4 * n_blocks               bytes, fp32
    # with double quantization (blockwise 8-bit dynamic quantization of absmax - mean(absmax))
    absmax      = 1 * n_blocks               bytes, uint8 codes
    nested      = 4 * ceil(n_blocks / 256)   bytes, fp32 absmax of each block of 256 absmax codes
    offset      = 4                          bytes, fp32 mean(absmax)

Asymptotically that is ``0.5 + 4/64 = 0.5625`` bytes per parameter without double quantization and
``0.5 + 1/64 + 4/(64*256) = 0.515869140625`` with it (QLoRA Sec. 3: 32/64 = 0.5 bit vs
8/64 + 32/(64*256) = 0.127 bit of quantization constants per parameter).

Shared constants are NOT counted per weight: the 16-entry NF4 codebook (``NF4_CODEBOOK_BYTES``) and
the 256-entry signed dynamic map used for double quantization (``DYNAMIC_MAP_BYTES``) are module-level
constants of ``lorabench.quant.nf4``, cached once per device (``SHARED_CONSTANT_BYTES`` per device in
total, independent of the number of layers). bitsandbytes instead keeps a private copy of both maps
in every layer's ``QuantState`` (``get_4bit_type`` builds a new 16-entry tensor per call and
``quantize_blockwise`` copies the 256-entry map); ``bnb_extra_bytes_per_layer`` gives that overhead
so that the bnb comparison backend can be predicted too.
"""

from __future__ import annotations

from typing import Any

NF4_BLOCKSIZE = 64
"""Elements per NF4 block sharing one absmax (QLoRA's and bitsandbytes' default)."""

DQ_BLOCKSIZE = 256
"""Absmax values per second-level block of double quantization (bitsandbytes' value)."""

DEQUANT_CHUNK_ELEMS = 1 << 22
"""Elements lorabench's torch NF4 dequantization (``lorabench.quant.nf4``) decodes per chunk."""

NF4_CODEBOOK_ENTRIES = 16
"""Entries of the NF4 codebook (one per 4-bit code)."""

DYNAMIC_MAP_ENTRIES = 256
"""Entries of the signed 8-bit dynamic map used to quantize absmax (double quantization)."""

FP32_BYTES = 4
"""Bytes of one fp32 value (absmax, nested absmax, offset, codebook entries)."""

NF4_CODEBOOK_BYTES = NF4_CODEBOOK_ENTRIES * FP32_BYTES
"""Bytes of the fp32 NF4 codebook: 64. Shared per device, not counted per weight."""

DYNAMIC_MAP_BYTES = DYNAMIC_MAP_ENTRIES * FP32_BYTES
"""Bytes of the fp32 dynamic map: 1024. Shared per device, not counted per weight."""

SHARED_CONSTANT_BYTES = NF4_CODEBOOK_BYTES + DYNAMIC_MAP_BYTES
"""Bytes of all shared quantization constants on one device (1088), whatever the number of layers."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check(numel: int, blocksize: int, dq_blocksize: int) -> None:
    if not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel must be a positive int, got {numel!r}")
    if not isinstance(blocksize, int) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even int, got {blocksize!r}")
    if not isinstance(dq_blocksize, int) or dq_blocksize < 1:
        raise ValueError(f"dq_blocksize must be a positive int, got {dq_blocksize!r}")


def nf4_storage_bytes(
    numel: int, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True, dq_blocksize: int = DQ_BLOCKSIZE
) -> int:
    """Exact bytes of the tensors one NF4-quantized weight holds (shared codebooks excluded).

    Formula (``n_blocks = ceil(numel / blocksize)``)::

        ceil(numel / 2) + 4 * n_blocks                                         # no double quant
        ceil(numel / 2) + n_blocks + 4 * ceil(n_blocks / dq_blocksize) + 4      # double quant

    Args:
        numel: Elements of the unquantized weight (e.g. ``out_features * in_features``).
        blocksize: Elements per NF4 block sharing one absmax (bitsandbytes/QLoRA default 64).
        double_quant: Whether absmax is itself 8-bit quantized (QLoRA "double quantization").
        dq_blocksize: Absmax values per second-level block (bitsandbytes uses 256).

    Returns:
        Bytes, to the byte, of ``NF4Tensor.nbytes`` for such a weight.

    Raises:
        ValueError: If ``numel`` < 1, ``blocksize`` is not a positive even int, or ``dq_blocksize`` < 1.
    """
    _check(numel, blocksize, dq_blocksize)
    packed_bytes = _ceil_div(numel, 2)
    n_blocks = _ceil_div(numel, blocksize)
    if not double_quant:
        return packed_bytes + FP32_BYTES * n_blocks
    nested_bytes = FP32_BYTES * _ceil_div(n_blocks, dq_blocksize)
    offset_bytes = FP32_BYTES
    return packed_bytes + n_blocks + nested_bytes + offset_bytes


def nf4_bytes_per_param(
    numel: int | None = None,
    blocksize: int = NF4_BLOCKSIZE,
    double_quant: bool = True,
    dq_blocksize: int = DQ_BLOCKSIZE,
) -> float:
    """Bytes per quantized parameter.

    With ``numel`` this is exact: ``nf4_storage_bytes(numel, ...) / numel``. Without it, the
    large-weight limit ``0.5 + 4/blocksize`` (no double quant) or
    ``0.5 + 1/blocksize + 4/(blocksize * dq_blocksize)`` (double quant): 0.5625 and 0.515869140625
    for the defaults (QLoRA Sec. 3).

    Args:
        numel: Elements of the weight, or ``None`` for the asymptotic value.
        blocksize: Elements per NF4 block.
        double_quant: Whether absmax is 8-bit quantized.
        dq_blocksize: Absmax values per second-level block.

    Returns:
        Bytes per parameter (float).
    """
    if numel is not None:
        return nf4_storage_bytes(numel, blocksize, double_quant, dq_blocksize) / numel
    _check(1, blocksize, dq_blocksize)
    if not double_quant:
        return 0.5 + FP32_BYTES / blocksize
    return 0.5 + 1 / blocksize + FP32_BYTES / (blocksize * dq_blocksize)


def bnb_extra_bytes_per_layer(double_quant: bool = True) -> int:
    """Bytes bitsandbytes keeps per quantized layer beyond ``nf4_storage_bytes``.

    Its ``QuantState`` holds its own fp32 NF4 codebook (64 bytes) and, with double quantization, its
    own copy of the 256-entry dynamic map (1024 bytes); lorabench shares both per device.

    Args:
        double_quant: Whether the layer uses double quantization.

    Returns:
        64 or 1088 bytes (tensor bytes; a caching allocator rounds each tensor up further).
    """
    return NF4_CODEBOOK_BYTES + (DYNAMIC_MAP_BYTES if double_quant else 0)


def bnb_cpu_row_problem(in_features: int, blocksize: int = NF4_BLOCKSIZE) -> str | None:
    """Why bitsandbytes' CPU 4-bit path cannot be trusted for a linear with rows of ``in_features``.

    bitsandbytes 0.50.2's native CPU ``dequantize_4bit`` (``backends/cpu/ops.py`` -> ``cdequantize_blockwise_
    cpu_nf4_*``) returns wrong values on AVX512 CPUs when a row's length is not a multiple of the block size
    (measured on an AMD EPYC: rows of 96, 160 and 176 with blocksize 64 differ from bitsandbytes' own generic
    ``_dequantize_4bit_compute`` by up to 1.8; docs/SOURCES.md#bnb-cpu-kernels), and correct ones elsewhere.
    The same config is refused on every CPU, so the outcome does not depend on the CPU model (CUDA is
    unaffected).

    Returns:
        One line naming the problem, or None when ``in_features`` is a multiple of ``blocksize``.
    """
    if in_features % blocksize == 0:
        return None
    return (f"bitsandbytes' CPU 4-bit kernels mis-dequantize rows of {in_features} (not a multiple of "
            f"blocksize {blocksize}) on AVX512 CPUs")


def bnb_cpu_rows_problem(model: Any, blocksize: int = NF4_BLOCKSIZE) -> str | None:
    """:func:`bnb_cpu_row_problem` for the first quantized matrix of ``model`` (a ModelSpec) it applies to,
    naming the model and the matrix; None when bitsandbytes' CPU kernels handle every one."""
    for matrix in model.quantized_matrices():
        problem = bnb_cpu_row_problem(matrix.in_features, blocksize)
        if problem:
            return f"{problem} ({model.name} {matrix.name})"
    return None
