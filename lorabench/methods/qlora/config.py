"""QLoRA config: LoRA knobs plus the 4-bit storage of the frozen base."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from lorabench.errors import require
from lorabench.methods.base import Pairing
from lorabench.methods.lora.config import LoraConfig
from lorabench.quant.sizes import NF4_BLOCKSIZE


@dataclass(frozen=True)
class QLoraConfig(LoraConfig):
    """LoRA on a base whose linear weights are NF4 (lm_head, embeddings and norms stay 16-bit).

    The QLoRA paper applies LoRA to every linear layer (Sec. 4, "all linear transformer block layers"),
    so ``target_modules`` defaults to ``all-linear`` here, unlike plain LoRA.
    """

    name: ClassVar[str] = "qlora"
    labels: ClassVar[tuple[str, ...]] = ("qlora", "qlora[bnb]")
    COMPARE_VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {}
    PAIRINGS: ClassVar[tuple[Pairing, ...]] = (
        Pairing("qlora", "lora", "QLoRA vs LoRA", same_targets=True),  # the quantized variant of LoRA
        Pairing("qlora", "qlora[bnb]", "lorabench vs bitsandbytes QLoRA", in_compare=False))
    target_modules: str | tuple[str, ...] | None = "all-linear"
    double_quant: bool = True
    """Quantize the fp32 absmax constants to 8 bit (blocks of 256): 0.127 vs 0.5 bits/param."""
    blocksize: int = NF4_BLOCKSIZE
    """NF4 block size (elements per absmax)."""
    compute_dtype: str = "bf16"
    """dtype the weight is dequantized to for the matmul."""
    backend: str = "lorabench"
    """'lorabench' (own NF4 layer) or 'bitsandbytes' (bnb Linear4bit, for side-by-side comparison)."""
    dequant: str = "auto"
    """lorabench backend: 'triton' (one Triton kernel, no scratch), 'torch' (chunked torch ops, scratch
    of two 4M-element chunks), or 'auto' (triton on CUDA when triton imports, torch on the CPU)."""

    @classmethod
    def label_for(cls, knobs: Mapping[str, Any]) -> str:
        """``qlora[bnb]`` for runs on the bitsandbytes backend, else ``qlora``."""
        return "qlora[bnb]" if knobs.get("backend") == "bitsandbytes" else "qlora"

    def run_problem(self, model: Any, device: str) -> str | None:
        """The bitsandbytes backend on the CPU with a quantized linear whose rows bitsandbytes' CPU kernels
        get wrong (:func:`lorabench.quant.sizes.bnb_cpu_row_problem`)."""
        from lorabench.quant.sizes import bnb_cpu_rows_problem

        if device != "cpu" or self.backend != "bitsandbytes":
            return None
        problem = bnb_cpu_rows_problem(model, self.blocksize)
        return f"{problem}; use method.backend=lorabench, or device=cuda" if problem else None

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.backend in ("lorabench", "bitsandbytes"), f"qlora backend {self.backend!r} is unknown",
                "use backend=lorabench or backend=bitsandbytes")
        require(self.dequant in ("auto", "torch", "triton"), f"qlora dequant {self.dequant!r} is unknown",
                "use dequant=auto, dequant=torch or dequant=triton")
        require(self.compute_dtype in ("bf16", "fp16", "fp32"), f"compute_dtype {self.compute_dtype!r} is unknown",
                "use bf16, fp16 or fp32")
        require(self.blocksize in (32, 64, 128, 256), f"blocksize {self.blocksize} is not supported",
                f"use {NF4_BLOCKSIZE} (the NF4 default)")
