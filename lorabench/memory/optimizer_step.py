"""Temporaries of the optimizer step and of gradient accumulation at the end of backward (torch-free).

Read off the optimizer implementations (torch 2.13 ``torch/optim/adam.py``; bitsandbytes 0.50 optimizers)
and checked against the fake-tensor trace (tests/memory/test_optimizer_step.py; docs/SOURCES.md#torch-adamw):

* ``foreach`` (torch's default on CUDA): ``_multi_tensor_adam`` computes ``exp_avg_sq_sqrt =
  torch._foreach_sqrt(exp_avg_sqs)`` for every parameter at once, then divides/adds in place: one
  temporary the size of all second moments.
* ``for-loop`` (``foreach=False``, torch's default on the CPU): ``_single_tensor_adam`` runs
  ``(exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)`` per parameter: the sqrt and the quotient
  coexist for a moment, two temporaries of the largest parameter.
* ``fused`` (``fused=True``; the HF Trainer's ``adamw_torch_fused``): one ``_fused_adamw_`` kernel updates
  in place, no temporary.
* SGD (with or without momentum) updates in place; bitsandbytes' 8-bit and paged optimizers run one fused
  CUDA kernel per parameter (``optimizer_update_8bit_blockwise``, ``optimizer_update_32bit``): no temporary.
"""

from __future__ import annotations

from lorabench.specs import OptimizerSpec

#: ``TrainSpec.adamw_impl`` values: torch's three AdamW implementations.
ADAMW_IMPLS: tuple[str, ...] = ("foreach", "fused", "for-loop")


def step_temporary_bytes(optimizer: OptimizerSpec, impl: str, state_bytes: int, largest_param_state_bytes: int) -> int:
    """Bytes the optimizer step allocates on top of weights, gradients and states.

    Args:
        optimizer: the state layout (only torch's ``adamw`` has temporaries).
        impl: ``foreach``, ``fused`` or ``for-loop``.
        state_bytes: per-GPU bytes of all optimizer states (m and v).
        largest_param_state_bytes: bytes of ONE state of the largest trainable tensor.
    """
    if optimizer.name != "adamw":
        return 0
    if impl == "foreach":
        return state_bytes // optimizer.states_per_param  # sqrt(v) of every parameter
    if impl == "for-loop":
        return 2 * largest_param_state_bytes  # sqrt(v) and sqrt(v) / bias_correction of one parameter
    return 0


def tied_embedding_transient_bytes(vocab_size: int, hidden_size: int, grad_bytes_per_element: float,
                                   tied_and_trained: bool) -> int:
    """The end of backward of a trained, tied embedding: the gradient from the lm_head use waits in the
    engine's input buffer of the shared weight until the embedding's own gradient arrives; their sum is a
    third V x h buffer (then the first two are freed). Two V x h gradients beyond the final ``.grad``
    (observed in the trace of Qwen2.5-0.5B full fine-tuning with SGD: 2 x 151,936 x 896 x 2 B)."""
    return int(2 * vocab_size * hidden_size * grad_bytes_per_element) if tied_and_trained else 0
