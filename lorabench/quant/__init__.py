"""lorabench's own 4-bit NormalFloat (NF4) quantization, bitsandbytes-compatible.

Modules (import them explicitly; this package imports nothing so that ``import lorabench.quant.sizes``
stays torch-free):

- ``sizes``: exact storage bytes of an NF4-quantized weight (stdlib only; used by the memory planner).
- ``nf4``: ``quantize_nf4`` / ``dequantize_nf4`` and the ``NF4Tensor`` container (torch).
- ``linear4bit``: ``Linear4bit``, a frozen NF4 linear layer whose backward re-dequantizes (torch).
- ``bnb_backend``: the same layer built by bitsandbytes, for side-by-side comparison (lazy import).

Source: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314,
Sec. 3 and Appendix; bitsandbytes ``functional.quantize_4bit`` / ``dequantize_4bit``.
"""
