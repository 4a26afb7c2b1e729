"""QLoRA's step-time terms (torch-free): LoRA's adapter path plus NF4 dequantization as memory traffic.

Every quantized linear dequantizes its NF4 weight to the compute dtype in forward, again in backward for the
input gradient (bitsandbytes MatMul4Bit and lorabench's Linear4bit keep only the packed weight), and once more
when gradient checkpointing recomputes the layer (Dettmers et al. 2023, QLoRA, arXiv:2305.14314, Sec. 3).
Bytes per element of one dequantization:

* bitsandbytes' CUDA kernel, and lorabench's Triton kernel (``dequant=triton``, what ``auto`` picks on a GPU),
  read 0.5 B of codes and 1/64 B of double-quantized absmax and write e B: 0.5 + 1/64 + e (plus the small
  absmax dequantization), 2 kernels per weight;
* lorabench's torch implementation (``dequant=torch``, what ``auto`` picks on the CPU;
  lorabench/quant/nf4.py ``dequantize_nf4``) widens the packed bytes to
  int32 (0.5 read + 2 written per element), gathers fp32 code pairs (2 read + 4 written) and scales them into
  the output (4 read + e written): 12.5 + e; ~23 aten ops per weight (absmax dequantization, views, the
  chunk loop), 3 more per extra chunk of 4M elements.
"""

from __future__ import annotations

from lorabench.methods.lora.dora_steptime import cast_bytes, dora_work, extra_dequant_matrices
from lorabench.methods.lora.steptime import fold_work, lora_work, trainable_tensors
from lorabench.methods.qlora.config import QLoraConfig
from lorabench.quant.sizes import DEQUANT_CHUNK_ELEMS, NF4_BLOCKSIZE
from lorabench.specs import DTYPE_BYTES, ModelSpec, TrainSpec
from lorabench.steptime.work import Work

__all__ = ["adapter_work", "dequant_work", "extra_dequant_work", "fold_work", "trainable_tensors"]


def adapter_work(model: ModelSpec, cfg: QLoraConfig, train: TrainSpec) -> tuple[Work, Work]:
    """LoRA's path plus, with ``use_dora``, DoRA's: the weight the norm reads comes dequantized in the compute
    dtype and is cast to the adapter dtype (its dequantization is :func:`extra_dequant_work`)."""
    e = DTYPE_BYTES[train.compute_dtype]
    (lf, lb), (df, db) = lora_work(model, cfg, train), dora_work(model, cfg, train, lambda m, a: cast_bytes(m, e, a))
    return lf + df, lb + db


def fused_kernel(cfg: QLoraConfig, device_kind: str) -> bool:
    """Whether one kernel dequantizes (bitsandbytes, or lorabench's Triton path), else the torch ops."""
    if cfg.backend == "bitsandbytes":
        return True
    return cfg.dequant == "triton" or (cfg.dequant == "auto" and device_kind == "gpu")


def dequant_work(model: ModelSpec, cfg: QLoraConfig, train: TrainSpec, device_kind: str = "gpu") -> Work:
    """One dequantization of every quantized weight of all layers (the caller multiplies by the passes)."""
    return _dequant(model.quantized_matrices(), model, cfg, train, device_kind)


def extra_dequant_work(model: ModelSpec, cfg: QLoraConfig, train: TrainSpec, device_kind: str = "gpu") -> Work:
    """Per forward, DoRA's weight norm dequantizes every adapted 4-bit weight once more (PEFT's
    ``dequantize_module_weight``); zero Work without ``use_dora``."""
    return _dequant(extra_dequant_matrices(model, cfg), model, cfg, train, device_kind)


def _dequant(matrices: tuple, model: ModelSpec, cfg: QLoraConfig, train: TrainSpec, device_kind: str) -> Work:
    e = DTYPE_BYTES[train.compute_dtype]
    fused = fused_kernel(cfg, device_kind)
    per_elem = (0.5 + 1 / NF4_BLOCKSIZE + e) if fused else (12.5 + e)
    out = Work()
    for m in matrices:
        n = m.in_features * m.out_features * m.copies
        kernels = 2 if fused else 20 + 3 * -(-n // DEQUANT_CHUNK_ELEMS)
        out = out + Work(0.0, n * per_elem, kernels)
    return out * model.num_layers
