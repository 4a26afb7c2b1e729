"""DoRA's step-time terms (torch-free; docs/SOURCES.md#dora-time): what :func:`lorabench.methods.lora.dora.dora_delta`
adds to LoRA's adapter path, per adapted matrix (in -> out, n = in * out, rank r, T tokens, adapter dtype of
a bytes, compute dtype of e bytes).

Forward, weight-sized (independent of T; the weight norm of ``W + s B A``, DoRA Sec. 4.1, PEFT's
``DoraLinearLayer``):

* ``lora_B(lora_A(eye(in)))``: 2 r in (in + out) FLOPs (the identity goes through both matmuls, so the A
  product costs in^2 r multiply-adds on top of B A's out r in); bytes: eye written and read (2 in^2 a), the
  in x r product written and read (2 in r a), the n-element product written (n a);
* the frozen weight in the adapter dtype: a cast (n (w + a), w the stored dtype's bytes) unless it already has
  that dtype; a 4-bit weight is first dequantized once more (counted as dequant work,
  :func:`extra_dequant_matrices`), then cast from e;
* the norm: ``s * BA`` (2 n a), ``+ W`` (3 n a), the row norm reading the sum (n a), 3n FLOPs.

Forward, token-sized: ``(scale - 1) * result`` (T out (e + a)) and one more add (3 T out a); a bias first
subtracted from ``result`` (2 T out e); with dropout p > 0 the base output recomputed from the dropped-out
input (2 T in out FLOPs, (T in + n + T out) a bytes).

Backward: the norm is detached and ``lora_weight`` enters it detached, so nothing weight-sized runs again
(dropout aside: the recomputed base output's input gradient, as much as its forward). The two broadcast
products give the magnitude its gradient (per product: grad x other, the reduction over T, grad x scale:
6 T out a) and ``result`` a second gradient to accumulate (3 T out e): 12 T out a + 3 T out e bytes, 6 T out FLOPs.

Kernels: 18 aten ops forward and 13 backward per adapted matrix (LoRA with and without use_dora counted on the
real stack, tests/steptime/test_op_counts.py).
"""

from __future__ import annotations

from typing import Callable

from lorabench.methods.lora import memory
from lorabench.methods.lora.config import LoraConfig
from lorabench.methods.terms import adapter_dtype
from lorabench.specs import DTYPE_BYTES, MatrixSpec, ModelSpec, TrainSpec
from lorabench.steptime.work import Work

FORWARD_OPS = 18
BACKWARD_OPS = 13


def weight_norm_work(m: MatrixSpec, r: int, a: float) -> Work:
    """The detached norm of ``W + s B A`` (without getting W into the adapter dtype), one matrix."""
    i, o = m.in_features, m.out_features
    n = i * o
    return Work(2.0 * r * i * (i + o) + 3.0 * n, 2 * i * i * a + 2 * i * r * a + n * a + 6 * n * a, 0)


def token_work(m: MatrixSpec, cfg: LoraConfig, t: int, a: float, e: float) -> tuple[Work, Work]:
    """(forward, backward) work of DoRA's rescaling of one matrix's T tokens."""
    i, o = m.in_features, m.out_features
    fwd = Work(2.0 * t * o, t * o * (e + a) + 3 * t * o * a + (2 * t * o * e if m.bias else 0), FORWARD_OPS)
    bwd = Work(6.0 * t * o, 12 * t * o * a + 3 * t * o * e, BACKWARD_OPS)
    if cfg.lora_dropout > 0:
        recompute = Work(2.0 * t * i * o, (t * i + i * o + t * o) * a, 0)
        fwd, bwd = fwd + recompute, bwd + recompute
    return fwd, bwd


def dora_work(model: ModelSpec, cfg: LoraConfig, train: TrainSpec,
              weight_cast_bytes: Callable[[MatrixSpec, float], float]) -> tuple[Work, Work]:
    """(forward, backward) work DoRA adds over LoRA in all layers (zero Work without ``use_dora``).

    Args:
        weight_cast_bytes: bytes of turning the frozen matrix (as the norm gets it) into the adapter dtype of
            ``a`` bytes per element (dense LoRA: :func:`dense_cast_bytes`).
    """
    if not cfg.use_dora:
        return Work(), Work()
    t, e = train.tokens_per_step, DTYPE_BYTES[train.compute_dtype]
    a = DTYPE_BYTES[adapter_dtype(cfg, train)]
    fwd, bwd = Work(), Work()
    for m in memory.targets(model, cfg):
        f, b = token_work(m, cfg, t, a, e)
        fwd = fwd + f + weight_norm_work(m, cfg.rank_for(m.name), a) + Work(0.0, weight_cast_bytes(m, a), 0)
        bwd = bwd + b
    return fwd * model.num_layers, bwd * model.num_layers


def cast_bytes(m: MatrixSpec, from_bytes: float, to_bytes: float) -> float:
    """One copy of the (out, in) weight from one dtype to another (none when they match)."""
    return 0.0 if from_bytes == to_bytes else m.in_features * m.out_features * (from_bytes + to_bytes)


def extra_dequant_matrices(model: ModelSpec, cfg: LoraConfig) -> tuple[MatrixSpec, ...]:
    """Quantized matrices dequantized once more per forward for DoRA's weight norm (the adapted ones)."""
    if not cfg.use_dora:
        return ()
    chosen = {m.name for m in memory.targets(model, cfg)}
    return tuple(m for m in model.quantized_matrices() if m.name in chosen)
