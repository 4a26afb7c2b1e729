"""NF4 (4-bit NormalFloat) blockwise quantization with double quantization, bitsandbytes-compatible.

Format (QLoRA, Dettmers et al. 2023, arXiv:2305.14314, Sec. 3 and Appendix; bitsandbytes
``functional.quantize_4bit(..., quant_type="nf4")``), for a weight ``W`` flattened row-major to ``x``:

1. Blocks of ``blocksize`` (64) elements; ``absmax_b = max_i |x_i|`` over block ``b`` (fp32).
2. ``s_i = clamp(x_i * (1 / absmax_b), -1, 1)``; ``q_i`` = index of the nearest of the 16 NF4 codes
   (``NF4_CODE``), ties to the LOWER code, i.e. ``q_i = #{k : m_k < s_i}`` with fp32 midpoints
   ``m_k = (c_k + c_{k+1}) / 2``.
3. Two codes per byte, first element in the HIGH nibble: ``byte_j = q_{2j} << 4 | q_{2j+1}``;
   an odd element count is padded with the code of 0.0 (7).
4. Double quantization (QLoRA Sec. 3): ``offset = mean(absmax)``; ``absmax - offset`` is quantized
   the same way in blocks of ``dq_blocksize`` (256) with the 256-entry signed dynamic map
   (``dynamic_map()``, Dettmers 2015, arXiv:1511.04561), giving uint8 codes, an fp32 absmax per
   256-block (``nested_absmax``) and the fp32 ``offset``.
5. Dequantization: ``absmax_b = dyn[a_b] * nested_absmax_{b // 256} + offset`` (fp32, double quant
   only), then ``w_i = NF4_CODE[q_i] * absmax_{i // 64}`` in fp32, rounded once to the output dtype.

Bit-for-bit compatibility with bitsandbytes' CPU backend (tested): the same fp32 arithmetic as its
default ``quantize_4bit`` op, including two quirks of its trailing partial 4-bit block: that block is
scaled by division ``x / absmax`` (full blocks by the reciprocal product) and its stored absmax is
clamped to at least 1e-38. Full blocks clamp only the divisor (no NaN for all-zero blocks; stored
absmax 0). The nested 8-bit codes are the true nearest dynamic-map codes; bitsandbytes' CPU kernel
(0.50) looks them up in a 65536-entry grid instead, so it differs for values within one grid step
(2/65535) of a midpoint (~0.2% of absmax codes on randn weights, always by one code), and it gives
code 0 instead of 127 (the code of 0.0) to all-zero blocks; those decode to the same value.

Shared constants: the NF4 codebook and the dynamic map are cached once per device and are not part
of any ``NF4Tensor`` (see ``lorabench.quant.sizes``). Weights must be finite.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import unset_fake_temporarily

from lorabench.quant.sizes import DEQUANT_CHUNK_ELEMS, DQ_BLOCKSIZE, NF4_BLOCKSIZE

NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
"""The 16 NF4 values (index = 4-bit code): quantiles of N(0, 1) normalized to [-1, 1] with an exact
zero (QLoRA Sec. 3, Eq. 4 and Appendix E; bitsandbytes ``get_4bit_type("nf4")``)."""

TINY_ABSMAX = 1e-38
"""Lower clamp of a block's absmax before taking its reciprocal (bitsandbytes' value): no NaN for
all-zero blocks, no inf for subnormal ones."""

CHUNK_ELEMS = DEQUANT_CHUNK_ELEMS
"""Elements processed per vectorized step. Bounds quantize/dequantize temporaries to ~6 bytes x 4M
regardless of the weight's size (the fp32 products are written straight into the output dtype)."""

QUANT_TYPE = "nf4"


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit dynamic data type of Dettmers 2015 (arXiv:1511.04561), sorted, fp32 on the CPU.

    For exponent ``e = 0 .. max_exponent_bits-1`` the decade ``10**(e - max_exponent_bits + 1)``
    holds the midpoints of ``linspace(0.1, 1, 2**(e + total_bits - 1 - max_exponent_bits) + 1)``
    (one more bit when unsigned), with both signs when ``signed``; then 0 and 1.0 are added (the
    count must come out at exactly ``2**total_bits``). The fp32 arithmetic follows bitsandbytes'
    ``create_dynamic_map`` so that the values are identical (signed: 256 values in [-0.99296875, 1]).
    """
    value_bits = total_bits - 1
    values: list[float] = []
    extra_items = 2 ** (value_bits - max_exponent_bits) - 1
    spans = [(e, 2 ** (e + value_bits - max_exponent_bits + (0 if signed else 1)) + 1)
             for e in range(max_exponent_bits)]  # fmt: skip
    if extra_items > 0:
        spans.append((max_exponent_bits - 1, extra_items + 1))
    for exponent, n_points in spans:
        edges = torch.linspace(0.1, 1, n_points, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (exponent - (max_exponent_bits - 1))
        values += (decade * means).tolist() + ((-decade * means).tolist() if signed else [])
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise ValueError(f"{max_exponent_bits=} and {total_bits=} do not give 2**total_bits values")
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass(frozen=True)
class _Constants:
    nf4: torch.Tensor  # (16,) fp32
    nf4_bounds: torch.Tensor  # (15,) fp32 midpoints
    nf4_pairs: torch.Tensor  # (256, 2) fp32: byte -> (code[high nibble], code[low nibble])
    dyn: torch.Tensor  # (256,) fp32
    dyn_bounds: torch.Tensor  # (255,) fp32 midpoints


@lru_cache(maxsize=None)
def _dynamic_map_values() -> tuple[float, ...]:
    with unset_fake_temporarily():  # real arithmetic even if first called while tracing
        return tuple(dynamic_map(signed=True).tolist())


_CONSTANTS: dict[torch.device, _Constants] = {}


def _constants(device: torch.device) -> _Constants:
    """Shared constants on ``device``: cached once per device, except under ``FakeTensorMode``
    (tracing), where they are rebuilt as fake tensors so that real and fake never mix."""
    tracing = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    if not tracing and device in _CONSTANTS:
        return _CONSTANTS[device]
    nf4 = torch.tensor(NF4_CODE, dtype=torch.float32)
    dyn = torch.tensor(_dynamic_map_values(), dtype=torch.float32)
    byte = torch.arange(256)
    pairs = torch.stack([nf4[byte >> 4], nf4[byte & 15]], dim=1)
    tensors = (nf4, (nf4[:-1] + nf4[1:]) / 2, pairs, dyn, (dyn[:-1] + dyn[1:]) / 2)
    consts = _Constants(*(t.to(device).contiguous() for t in tensors))
    if not tracing:
        _CONSTANTS[device] = consts
    return consts


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The shared fp32 NF4 codebook on ``device`` (do not modify it in place)."""
    return _constants(torch.device(device)).nf4


def shared_dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The shared fp32 signed dynamic map on ``device`` (do not modify it in place)."""
    return _constants(torch.device(device)).dyn


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it owns exactly its bytes (so storage bytes == logical bytes), else a compact copy."""
    exact = t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if exact and t.is_contiguous() else t.contiguous().clone()


def _quantize_blocks(
    x: torch.Tensor, blocksize: int, bounds: torch.Tensor, partial_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax codes of a zero-padded fp32 vector: (uint8 codes, fp32 absmax per block).

    ``partial_last`` applies bitsandbytes' trailing-block rule of its 4-bit op (divide; clamp the
    stored absmax). Its 8-bit CPU kernel (double quantization) has no such rule, hence False there.
    """
    blocks = x.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax.clamp(min=TINY_ABSMAX)).unsqueeze(1)
    if partial_last:  # bitsandbytes: the trailing partial block is divided, its absmax clamped
        absmax[-1] = absmax[-1].clamp(min=TINY_ABSMAX)
        scaled[-1] = blocks[-1] / absmax[-1]
    scaled.clamp_(-1.0, 1.0)
    codes = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    return codes.view(-1), absmax


def _scale_blocks_into(
    out: torch.Tensor, codes_fp32: torch.Tensor, scales: torch.Tensor, blocksize: int
) -> None:
    """``out[i] = codes_fp32[i] * scales[i // blocksize]``, in fp32, rounded once to ``out.dtype``."""
    n = out.numel()
    n_full = n // blocksize
    full = n_full * blocksize
    if n_full:
        torch.mul(codes_fp32[:full].view(n_full, blocksize), scales[:n_full].unsqueeze(1),
                  out=out[:full].view(n_full, blocksize))  # fmt: skip
    if full < n:
        torch.mul(codes_fp32[full:n], scales[n_full], out=out[full:])


def _chunks(numel: int, blocksize: int) -> Iterator[tuple[int, int, int, int]]:
    """(first block, end block, first element, end element) of each chunk of whole blocks."""
    n_blocks = -(-numel // blocksize)
    step = max(1, CHUNK_ELEMS // blocksize)
    for b0 in range(0, n_blocks, step):
        b1 = min(n_blocks, b0 + step)
        yield b0, b1, b0 * blocksize, min(numel, b1 * blocksize)


@dataclass(frozen=True, eq=False, repr=False)
class NF4Tensor:
    """A quantized weight: packed 4-bit codes plus the constants needed to dequantize them.

    Attributes:
        packed: ``(ceil(numel/2),)`` uint8, two codes per byte, first element in the high nibble.
        absmax: ``(n_blocks,)`` fp32 absmax, or uint8 dynamic-map codes with double quantization.
        shape: Shape of the original weight (``(out_features, in_features)`` for a linear layer).
        dtype: Dtype of the original weight (the default dequantization dtype).
        blocksize: Elements per NF4 block.
        nested_absmax: ``(ceil(n_blocks/dq_blocksize),)`` fp32, or ``None`` without double quant.
        offset: 0-dim fp32 ``mean(absmax)``, or ``None`` without double quant.
        dq_blocksize: Absmax codes per nested block.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = NF4_BLOCKSIZE
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    dq_blocksize: int = DQ_BLOCKSIZE

    requires_grad = False  # class attribute, not a field: a quantized weight is never trained

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(self.shape))
        n = self.numel()
        n_blocks = -(-n // self.blocksize)
        if self.packed.dtype != torch.uint8 or self.packed.numel() != -(-n // 2):
            raise ValueError(f"packed must be {-(-n // 2)} uint8 values for shape {tuple(self.shape)}")
        if self.absmax.numel() != n_blocks:
            raise ValueError(f"absmax must have {n_blocks} values, got {self.absmax.numel()}")
        if (self.nested_absmax is None) != (self.offset is None):
            raise ValueError("nested_absmax and offset must be given together (double quantization)")
        want = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != want:
            raise ValueError(f"absmax must be {want} here, got {self.absmax.dtype}")

    @property
    def double_quant(self) -> bool:
        """Whether absmax is itself quantized (QLoRA double quantization)."""
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        """Elements of the original (unquantized) weight."""
        return math.prod(self.shape)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor this object holds (shared codebooks excluded)."""
        extra = () if self.nested_absmax is None else (self.nested_absmax, self.offset)
        return (self.packed, self.absmax, *extra)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Storage bytes of ``tensors()``; equals ``sizes.nf4_storage_bytes`` for quantized weights."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    def to(self, device: torch.device | str) -> NF4Tensor:
        """A copy on ``device`` (dtypes never change: quantized data is not cast)."""
        moved = {f: getattr(self, f).to(device) for f in ("packed", "absmax", "nested_absmax", "offset")
                 if getattr(self, f) is not None}  # fmt: skip
        return dataclasses.replace(self, **moved)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Same as ``dequantize_nf4(self, dtype)``."""
        return dequantize_nf4(self, dtype)

    def __repr__(self) -> str:
        dq = f"double_quant(dq_blocksize={self.dq_blocksize})" if self.double_quant else "fp32 absmax"
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"{dq}, nbytes={self.nbytes}, device={self.device})")  # fmt: skip

    def to_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """bitsandbytes-compatible entries (the keys a ``bnb.nn.Linear4bit`` state dict uses).

        ``prefix`` holds the packed codes as ``(ceil(numel/2), 1)`` uint8; ``prefix.absmax``,
        ``prefix.quant_map`` (16 fp32), and with double quantization ``prefix.nested_absmax`` and
        ``prefix.nested_quant_map`` (256 fp32); ``prefix.quant_state.bitsandbytes__nf4`` is the
        UTF-8 JSON of the non-tensor fields as a uint8 tensor. The maps are copies (serialization).
        """
        consts = _constants(self.device)
        info: dict[str, object] = {"quant_type": QUANT_TYPE, "blocksize": self.blocksize,
                                   "dtype": str(self.dtype).removeprefix("torch."),
                                   "shape": list(self.shape)}  # fmt: skip
        out = {prefix: self.packed.view(-1, 1), f"{prefix}.absmax": self.absmax,
               f"{prefix}.quant_map": consts.nf4.clone()}  # fmt: skip
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax  # type: ignore[assignment]
            out[f"{prefix}.nested_quant_map"] = consts.dyn.clone()
            info.update(nested_blocksize=self.dq_blocksize, nested_dtype="float32",
                        nested_offset=float(self.offset.item()))  # type: ignore[union-attr]  # fmt: skip
        blob = bytearray(json.dumps(info).encode("utf-8"))
        out[f"{prefix}.quant_state.bitsandbytes__{QUANT_TYPE}"] = torch.frombuffer(blob, dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Tensor:
        """Inverse of ``to_state_dict``; also reads state dicts saved by bitsandbytes (nf4 only).

        Raises:
            KeyError: If a required entry is missing.
            ValueError: If the entries are not NF4 or use maps other than lorabench's constants.
        """
        info = json.loads(bytes(state[f"{prefix}.quant_state.bitsandbytes__{QUANT_TYPE}"].cpu().tolist()))
        if info.get("quant_type") != QUANT_TYPE:
            raise ValueError(f"{prefix}: quant_type {info.get('quant_type')!r} is not supported, only nf4")
        packed = state[prefix]
        consts = _constants(torch.device("cpu"))
        _check_map(state.get(f"{prefix}.quant_map"), consts.nf4, f"{prefix}.quant_map")
        nested = offset = None
        if "nested_offset" in info:
            _check_map(state.get(f"{prefix}.nested_quant_map"), consts.dyn, f"{prefix}.nested_quant_map")
            nested = _compact(state[f"{prefix}.nested_absmax"].float())
            offset = torch.tensor(float(info["nested_offset"]), dtype=torch.float32, device=packed.device)
        return cls(packed=_compact(packed.reshape(-1)), absmax=_compact(state[f"{prefix}.absmax"]),
                   shape=torch.Size(info["shape"]), dtype=getattr(torch, info["dtype"]),
                   blocksize=int(info["blocksize"]), nested_absmax=nested, offset=offset,
                   dq_blocksize=int(info.get("nested_blocksize", DQ_BLOCKSIZE)))  # fmt: skip


def _check_map(stored: torch.Tensor | None, expected: torch.Tensor, key: str) -> None:
    if stored is not None and not torch.equal(stored.detach().cpu().float(), expected):
        raise ValueError(f"{key} differs from lorabench's shared constant; cannot load this checkpoint")


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True, dq_blocksize: int = DQ_BLOCKSIZE
) -> NF4Tensor:
    """Quantize ``weight`` (fp32/bf16/fp16, any shape, any device) to NF4; see the module docstring.

    Args:
        weight: Finite floating-point tensor with at least one element.
        blocksize: Elements per block sharing one absmax (positive, even; bitsandbytes uses 64).
        double_quant: Quantize absmax with the 8-bit dynamic map in blocks of ``dq_blocksize``.
        dq_blocksize: Absmax values per nested block (bitsandbytes uses 256).

    Returns:
        An ``NF4Tensor`` whose ``nbytes`` equals ``sizes.nf4_storage_bytes(weight.numel(), ...)``.

    Raises:
        ValueError: On an empty or non-floating weight or an invalid block size.
    """
    if not weight.is_floating_point() or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty floating-point tensor, got {weight.dtype}")
    if blocksize < 2 or blocksize % 2 or dq_blocksize < 1:
        raise ValueError(f"blocksize must be positive and even (got {blocksize}), dq_blocksize >= 1")
    flat = weight.detach().reshape(-1)
    n, device = flat.numel(), flat.device
    n_blocks = -(-n // blocksize)
    consts = _constants(device)
    packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=device)
    for b0, b1, e0, e1 in _chunks(n, blocksize):
        x = flat[e0:e1].float()
        padded = (b1 - b0) * blocksize
        if e1 - e0 < padded:
            x = F.pad(x, (0, padded - (e1 - e0)))
        codes, absmax[b0:b1] = _quantize_blocks(x, blocksize, consts.nf4_bounds, e1 - e0 < padded)
        pairs = codes.view(-1, 2)
        n_bytes = -(-e1 // 2) - e0 // 2
        torch.bitwise_or(pairs[:n_bytes, 0] << 4, pairs[:n_bytes, 1], out=packed[e0 // 2 : e0 // 2 + n_bytes])
    if not double_quant:
        return NF4Tensor(packed, absmax, weight.shape, weight.dtype, blocksize)
    offset = absmax.mean()
    centered = absmax - offset
    padded = -(-n_blocks // dq_blocksize) * dq_blocksize
    centered = F.pad(centered, (0, padded - n_blocks))
    codes, nested = _quantize_blocks(centered, dq_blocksize, consts.dyn_bounds, partial_last=False)
    return NF4Tensor(packed, _compact(codes[:n_blocks]), weight.shape, weight.dtype, blocksize,
                     nested_absmax=nested, offset=offset, dq_blocksize=dq_blocksize)  # fmt: skip


def dequantize_absmax(q: NF4Tensor) -> torch.Tensor:
    """fp32 absmax per block: ``q.absmax``, or ``dyn[codes] * nested_absmax + offset`` (double quant)."""
    if not q.double_quant:
        return q.absmax
    consts = _constants(q.device)
    absmax = torch.empty(q.absmax.numel(), dtype=torch.float32, device=q.device)
    values = torch.index_select(consts.dyn, 0, q.absmax.int())
    _scale_blocks_into(absmax, values, q.nested_absmax, q.dq_blocksize)  # type: ignore[arg-type]
    return absmax.add_(q.offset)  # type: ignore[arg-type]


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize to ``dtype`` (default: the original dtype), shape ``q.shape``, on ``q.device``.

    ``w_i = NF4_CODE[q_i] * absmax_{i // blocksize}`` computed in fp32 and rounded once to ``dtype``
    (bit-identical to bitsandbytes' ``dequantize_4bit``). Temporaries are bounded by ``CHUNK_ELEMS``.
    """
    dtype = q.dtype if dtype is None else dtype
    consts = _constants(q.device)
    absmax = dequantize_absmax(q)
    n = q.numel()
    out = torch.empty(n, dtype=dtype, device=q.device)
    for b0, b1, e0, e1 in _chunks(n, q.blocksize):
        byte_idx = q.packed[e0 // 2 : -(-e1 // 2)].int()
        values = torch.index_select(consts.nf4_pairs, 0, byte_idx).view(-1)
        _scale_blocks_into(out[e0:e1], values, absmax[b0:b1], q.blocksize)
    return out.view(q.shape)
