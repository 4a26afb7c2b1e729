"""LoRA's step-time terms (torch-free): the adapter path of every targeted projection.

Per target (in -> out, rank r) and token, PEFT's LoRA Linear runs x.to(adapter dtype), lora_A, lora_B,
* scaling, + result and the cast back: 2r(in + out) FLOPs forward, 4r(in + out) backward (input and weight
gradients of both factors). These matmuls are r wide, so they are bound by the bytes they move: the fp32 copy
of x (T*in*(e + a)), A reading it (T*in*a), B's output (T*out*a), the scale and the add (promoting to a:
T*out*(3a + e)) and the cast back (T*out*(a + e)); dropout (p > 0) reads and writes x once more plus a mask.
Backward moves about twice the forward bytes in twice the kernels. With ``use_dora`` DoRA's work is added
(:mod:`lorabench.methods.lora.dora_steptime`; the frozen weight cast from the parameter dtype). With
``target_parameters``, :func:`fold_work` (in the parameter dtype, at its peak).
"""

from __future__ import annotations

from lorabench.methods.terms import adapter_dtype
from lorabench.methods.terms import no_extra_dequant as extra_dequant_work
from lorabench.methods.lora import memory
from lorabench.methods.lora.dora_steptime import cast_bytes, dora_work
from lorabench.methods.lora.config import LoraConfig
from lorabench.methods.lora.experts_memory import raw_targets
from lorabench.specs import DTYPE_BYTES, ModelSpec, TrainSpec
from lorabench.steptime.work import Work


#: aten ops per target per step (counted on the real stack, tests/steptime/test_op_counts.py).
FORWARD_OPS = 12
BACKWARD_OPS = 18


__all__ = ["adapter_work", "dequant_work", "extra_dequant_work", "fold_work", "lora_work", "trainable_tensors"]


def adapter_work(model: ModelSpec, cfg: LoraConfig, train: TrainSpec) -> tuple[Work, Work]:
    """(forward, backward) work of all layers' LoRA paths in one micro-step, DoRA's included."""
    p = DTYPE_BYTES[train.param_dtype]
    (lf, lb), (df, db) = lora_work(model, cfg, train), dora_work(model, cfg, train, lambda m, a: cast_bytes(m, p, a))
    return lf + df, lb + db


def fold_work(model: ModelSpec, cfg: LoraConfig, train: TrainSpec) -> tuple[Work, Work]:
    """(forward, backward) work of the ``target_parameters`` folds (:mod:`lorabench.methods.lora.experts`), or
    with ``experts_path="routed"`` of the grouped A and B matmuls over the routed tokens (2 n r (in + out) FLOPs
    forward, twice that backward, for n = T k rows; no weight-sized traffic, no weight-gradient matmul). On the
    PEFT stack each forward folds twice: ``register_parametrization``'s shape/dtype check (``unsafe=False``)
    evaluates it too (docs/SOURCES.md#peft-param-fold).

    Per adapted tensor of E x out x in (p bytes an element) and layer: forward, the baddbmm reads W and writes
    W' (2 E o i p bytes, 2 E o i r FLOPs) after casting the factors; backward, the weight-gradient matmul a
    frozen tensor skips (2 n o i FLOPs over its n rows: T k routed tokens for experts, T for the router,
    reading them and writing W's gradient) and the two factor matmuls reading that gradient (2 E o i p bytes,
    4 E o i r FLOPs).
    """
    t, p = train.tokens_per_step, DTYPE_BYTES[train.param_dtype]
    fwd = bwd = Work()
    for m in raw_targets(model, cfg):
        e, i, o = m.copies, m.in_features, m.out_features
        rows = t * (model.experts_per_token if e > 1 else 1)
        r = cfg.rank_for(m.parameter_path)
        if cfg.routes(m):  # the routed tokens through A_e and B_e, grouped
            f = Work(2.0 * rows * r * (i + o), rows * (i + 2 * r + o) * p + e * r * (i + o) * p, 5)
            fwd, bwd = fwd + f, bwd + f * 2
            continue
        folds = 2 if train.stack == "peft" else 1  # PEFT's checked registration evaluates the fold once more
        fwd = fwd + Work(2.0 * e * o * i * r, 2 * e * o * i * p + 2 * e * r * (i + o) * p, 3) * folds
        bwd = bwd + Work(2.0 * rows * o * i + 4.0 * e * o * i * r, rows * (i + o) * p + 3 * e * o * i * p, 5)
    return fwd * model.num_layers, bwd * model.num_layers


def lora_work(model: ModelSpec, cfg: LoraConfig, train: TrainSpec) -> tuple[Work, Work]:
    """(forward, backward) work of all layers' plain LoRA paths (A, B, scaling, the add, the casts)."""
    t, e = train.tokens_per_step, DTYPE_BYTES[train.compute_dtype]
    a = DTYPE_BYTES[adapter_dtype(cfg, train)]
    cast = a != e
    fwd = Work()
    for m in memory.targets(model, cfg):
        i, o, r = m.in_features, m.out_features, cfg.rank_for(m.name)
        flops = 2.0 * t * r * (i + o)
        nbytes = (t * i * (e + a) if cast else 0) + t * i * a + 2 * t * r * a + t * o * a \
            + t * o * (3 * a + e) + (t * o * (a + e) if cast else 0) + 2 * r * (i + o) * a
        if cfg.lora_dropout > 0:
            nbytes += t * i * (2 * a + 1)
        fwd = fwd + Work(flops, nbytes, FORWARD_OPS + (1 if cfg.lora_dropout > 0 else 0))
    fwd = fwd * model.num_layers
    n = len(memory.targets(model, cfg)) * model.num_layers
    return fwd, Work(2 * fwd.flops, 2 * fwd.bytes, BACKWARD_OPS * n)


def dequant_work(model: ModelSpec, cfg: LoraConfig, train: TrainSpec, device_kind: str = "gpu") -> Work:
    """No quantized weights."""
    return Work()


def trainable_tensors(model: ModelSpec, cfg: LoraConfig) -> int:
    """lora_A and lora_B per target (module or raw parameter) per layer."""
    return 2 * (len(memory.targets(model, cfg)) + len(raw_targets(model, cfg))) * model.num_layers
