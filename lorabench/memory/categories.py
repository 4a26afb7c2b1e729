"""Names of memory components, shared by the planner, the tracker, records and reports (stdlib only).

The planner predicts finer components than a tracker can observe; :data:`PLANNER_TO_TRACE` maps each
planner component to the tracker category that measures it, so the three ways of knowing a number
(predict, trace, measure) can be laid side by side.
"""

from __future__ import annotations

#: Planner components, in table order (bytes per GPU at the peak moment).
PLANNER_COMPONENTS: tuple[str, ...] = (
    "weights",            # frozen base weights kept in 16/32 bit (embeddings, norms, lm_head, unquantized linears)
    "quantized_weights",  # NF4 packed codes + quantization constants (absmax, double-quant constants)
    "trainable",          # trainable parameters (all weights for full FT; adapter weights otherwise)
    "gradients",          # .grad of trainable parameters
    "optimizer",          # optimizer states (Adam m and v; momentum)
    "master_weights",     # fp32 copies of 16-bit trainable weights kept by the optimizer
    "optimizer_temp",     # temporaries of the optimizer step (foreach AdamW's sqrt(v)) when the peak is in it
    "activations",        # tensors saved for backward and live temporaries at the peak
    "logits",             # logits, fp32 upcast, log-softmax and their gradients
    "cuda_context",       # CUDA context + library workspaces (device level only)
    "allocator_slack",    # caching-allocator reserved minus allocated (reserved level)
)

#: Categories a live-storage tracker can tell apart (trace and CPU measurement).
TRACE_CATEGORIES: tuple[str, ...] = (
    "weights_frozen",
    "weights_trainable",
    "quantized",
    "gradients",
    "optimizer",
    "activations",
)

#: Which tracker category measures each planner component (None: not a tensor, device level only).
PLANNER_TO_TRACE: dict[str, str | None] = {
    "weights": "weights_frozen",
    "quantized_weights": "quantized",
    "trainable": "weights_trainable",
    "gradients": "gradients",
    "optimizer": "optimizer",
    "master_weights": "optimizer",
    "optimizer_temp": "activations",
    "activations": "activations",
    "logits": "activations",
    "cuda_context": None,
    "allocator_slack": None,
}

#: The planner component each tracker category is shown beside (the first that maps to it).
TRACE_TO_PLANNER: dict[str, str] = {
    cat: next(c for c in PLANNER_COMPONENTS if PLANNER_TO_TRACE[c] == cat) for cat in TRACE_CATEGORIES
}

#: Components that are tensor bytes (the 'allocated' reconciliation level).
TENSOR_COMPONENTS: tuple[str, ...] = tuple(c for c, t in PLANNER_TO_TRACE.items() if t is not None)

#: Training phases a tracker attributes its peak to.
PHASES: tuple[str, ...] = ("setup", "forward", "backward", "optimizer")


def to_trace_categories(components: dict[str, int]) -> dict[str, int]:
    """Sum planner components into tracker categories (tensor components only)."""
    out = {c: 0 for c in TRACE_CATEGORIES}
    for name, value in components.items():
        cat = PLANNER_TO_TRACE.get(name)
        if cat is not None:
            out[cat] += int(value)
    return out
