"""The training loss as the planner sees it (torch-free): which implementation, its chunking, its bytes.

``TrainSpec.loss`` names how the causal-LM cross-entropy is computed:

- ``hf``: transformers' ``ForCausalLMLoss``: full-sequence logits ``b*s*V`` in the compute dtype, upcast to
  fp32, log-softmax; for 128k-vocabulary models often the largest activation of a step
  (:func:`lorabench.memory.activations.logits_peak_bytes`).
- ``chunked``: :mod:`lorabench.runtime.loss`: the lm_head matmul and the cross-entropy run over chunks of
  :func:`chunk_tokens` tokens, and each chunk's gradients (w.r.t. the hidden states and, when it trains,
  lm_head's weight) are formed right away, in the forward, as Liger-Kernel's fused linear cross-entropy does
  (Hsu et al. 2024, arXiv:2410.10989, Sec. 3.2, "Fused Linear Cross Entropy"): no full-sequence logits ever exist.
"""

from __future__ import annotations

LOSSES = ("hf", "chunked")
"""Valid values of ``TrainSpec.loss``."""

CHUNK_FP32_LOGITS_BYTES = 256 * 2**20
"""Budget of one chunk's fp32 logits: the chunk is the most tokens whose ``tokens x V`` fp32 logits fit in it
(523 tokens at a 128k vocabulary), at least one token."""


def chunk_tokens(tokens: int, vocab_size: int) -> int:
    """Tokens per chunk of the chunked loss: ``clamp(CHUNK_FP32_LOGITS_BYTES // (4 V), 1, tokens)``."""
    return max(1, min(tokens, CHUNK_FP32_LOGITS_BYTES // (4 * vocab_size)))


def chunked_loss_peak_bytes(tokens: int, hidden_size: int, vocab_size: int, *, hidden_bytes: float,
                            compute_bytes: float, weight_bytes: float, weight_grad: bool,
                            weight_cast: bool, softcap: bool = False) -> int:
    """Bytes the chunked loss holds at its fullest moment (besides the saved activations), per the trace.

    - the final hidden states ``T x h`` (its input) and their gradient, allocated up front (same dtype);
    - lm_head's weight gradient ``V x h`` in the weight's dtype when lm_head trains (formed in the forward);
    - a ``compute``-dtype copy of the weight when it is stored in another dtype (autocast);
    - per chunk of ``c`` tokens: the compute-dtype logits and their fp32 copy (``c V (e + 4)`` while the copy
      is made), then the fp32 probabilities turned in place into the logits' gradient and its compute-dtype
      cast (``c V (4 + e)``): ``c V (4 + e)`` with ``e = compute_bytes`` (``4 c V`` in fp32, where the upcast
      and the cast are no-ops); with logit soft-capping (Gemma-2) the fp32 ``tanh`` beside the capped logits:
      ``8 c V``, whichever is larger.
    """
    c = chunk_tokens(tokens, vocab_size)
    chunk = c * vocab_size * max(4 + (compute_bytes if compute_bytes < 4 else 0), 8 if softcap else 0)
    th = tokens * hidden_size * hidden_bytes
    weight = vocab_size * hidden_size
    extra = (weight * weight_bytes if weight_grad else 0) + (weight * compute_bytes if weight_cast else 0)
    return int(2 * th + extra + chunk)
