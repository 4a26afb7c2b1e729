"""Model FLOPs per training token, the numerator of MFU (torch-free; one source for plan and the runner)."""

from __future__ import annotations

from lorabench.specs import ModelSpec


def matmul_params(spec: ModelSpec) -> int:
    """Parameters that take part in a matmul per token: all but the embedding lookup (the head counts once,
    also when tied to the embedding matrix) and, in an MoE layer, the experts a token is not routed to
    (Mixtral: top-2 of 8, Jiang et al. 2024, arXiv:2401.04088: 12.9B active of 46.7B). Norm weights are
    counted too (negligible)."""
    tied_head = spec.vocab_size * spec.hidden_size if spec.tie_word_embeddings else 0
    idle = sum(m.in_features * m.out_features * (m.copies - spec.experts_per_token) for m in spec.matrices
               if m.copies > 1 and spec.experts_per_token)
    return spec.total_params - spec.embedding_params + tied_head - spec.num_layers * idle


def training_flops_per_token(spec: ModelSpec, trains_base: bool, trainable_params: int, attended_len: int) -> float:
    """Model FLOPs of one training token (forward + backward), excluding recomputation.

    Dense matmuls cost 2 FLOPs per parameter per token forward. Backward costs 2 more for the input gradient
    and, for a trainable weight, 2 more for the weight gradient (Kaplan et al. 2020, arXiv:2001.08361,
    Sec. 2.1: C = 6N per token). A frozen base weight still passes input gradients back, so with a parameter-
    efficient method it costs 4, and the adapter weights cost the full 6:

        full:      6 * N_matmul
        PEFT:      4 * N_matmul + 6 * N_trainable

    plus attention scores and values, 12 * L * n_heads * head_dim * T per token with T the number of attended
    positions (seq_len + virtual tokens for prefix tuning), as in PaLM (Chowdhery et al. 2022, arXiv:2204.02311,
    Appendix B: 6N + 12LHQT). Recomputation under gradient checkpointing is excluded, so this is MFU, not
    hardware FLOPs utilisation (PaLM App. B); NF4 dequantization is not counted either.
    """
    n_matmul = matmul_params(spec)
    dense = 6.0 * n_matmul if trains_base else 4.0 * n_matmul + 6.0 * trainable_params
    attention = 12.0 * spec.num_layers * spec.num_heads * spec.head_dim * attended_len
    return dense + attention
