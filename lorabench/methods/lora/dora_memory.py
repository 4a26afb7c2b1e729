"""DoRA's estimator terms (torch-free; docs/SOURCES.md#dora): the symbolic forward of
:func:`lorabench.methods.lora.dora.dora_delta`.

Per adapted linear (in -> out, T tokens, adapter dtype of e bytes), on top of LoRA's saved tensors:

* saved for backward: the base output ``result`` (T x out, kept by ``(scale - 1) * result``; ``result - bias``
  when the layer has a bias), ``lora_B(lora_A(x))`` (T x out in the adapter dtype, kept by
  ``scale * lora_result``) and the out-sized norm and scale vectors;
* alive until the layer's forward returns (the detached norm's inputs): ``eye(in)`` (in^2 e) and
  ``lora_A(eye)`` (in r e), both held by the graph of ``lora_weight`` (in x out, e), and the frozen weight
  in the adapter dtype (out x in, e: a copy unless the base already has that dtype, always for 4-bit);
* at the norm itself, ``scaling * lora_weight`` and the sum (2 x out x in x e); for a 4-bit base first its
  dequantization (scratch + the weight in its original dtype) before the copy;
* with dropout p > 0, PEFT recomputes the base output from the dropped-out input, ``F.linear(x, weight)``,
  which saves the weight copy.

Backward: each broadcast product hands the magnitude a T x out gradient before reducing it.
"""

from __future__ import annotations

from lorabench.memory.autograd import Graph, Sym
from lorabench.methods.lora.config import LoraConfig
from lorabench.specs import DTYPE_BYTES, MatrixSpec


def dora_path(g: Graph, x: Sym, base_out: Sym, m: MatrixSpec, cfg: LoraConfig, dtype: str, weight_dtype: str,
              dequant_scratch_bytes: int | None = None) -> Sym:
    """``result + dora_delta`` cast back to the result dtype.

    Args:
        weight_dtype: the dtype the frozen weight comes in (the parameter dtype; a 4-bit weight's original one).
        dequant_scratch_bytes: None for a dense base; for a 4-bit base the scratch its dequantization needs.
    """
    n_in, n_out, r = m.in_features, m.out_features, cfg.rank_for(m.name)
    e = DTYPE_BYTES[dtype]
    quantized = dequant_scratch_bytes is not None
    graph_held = int((n_in * n_in + n_in * r + n_in * n_out) * e)  # eye, lora_A(eye), lora_weight
    copy = int(n_out * n_in * e) if (quantized or weight_dtype != dtype) else 0
    at_norm = graph_held + copy + int(2 * n_out * n_in * e)
    if quantized:
        original = int(n_out * n_in * DTYPE_BYTES[weight_dtype])
        at_norm = max(at_norm, graph_held + original + max(dequant_scratch_bytes or 0,
                                                           copy if weight_dtype != dtype else 0))
    g.hold(base_out)  # `result` stays in a variable while the adapter path runs
    xa = g.to(x, dtype)
    xd = g.dropout(xa, cfg.lora_dropout)
    norm = g.record((), g.new(n_out, dtype, False), forward_transient_bytes=at_norm)
    dropout_copy_saved = cfg.lora_dropout > 0 and xd.requires_grad and copy > 0
    held = g.new(graph_held + (0 if dropout_copy_saved else copy), "int8", False)
    g.hold(held)
    g.save(norm)  # magnitude / norm keeps the norm
    magnitude = g.param(n_out, dtype, True)
    lora_result = g.linear(g.linear(xd, r, n_in, dtype, True), n_out, r, dtype, True)
    if cfg.lora_dropout > 0:
        if dropout_copy_saved:
            g.save(g.new(n_out * n_in, dtype, False))  # F.linear(x, weight) keeps the weight copy
        base_result = g.record((xd,), g.new(base_out.numel, dtype, xd.requires_grad))
    elif m.bias:
        base_result = g.elementwise(base_out)  # result - bias
    else:
        base_result = base_out
    scaled_base = g.mul(magnitude, base_result, numel=base_out.numel)
    scaled_lora = g.scale(g.mul(magnitude, lora_result, numel=base_out.numel))
    out = g.add(base_out, g.add(scaled_base, scaled_lora))
    g.drop(held)
    g.drop(base_out)
    return g.to(out, base_out.dtype)


def magnitude_params(matrices: tuple[MatrixSpec, ...]) -> int:
    """One magnitude per output feature of each adapted matrix (of one layer)."""
    return sum(m.out_features for m in matrices)
