"""``--explain``: each component's formula with the numbers filled in and its source (torch-free)."""

from __future__ import annotations

from lorabench.memory.planner import Prediction, calibration
from lorabench.methods import MethodConfig, get as get_method
from lorabench.methods.protocols import Estimator
from lorabench.specs import DTYPE_BYTES, ModelSpec, TrainSpec
from lorabench.units import gib


def explain(model: ModelSpec, method: MethodConfig, train: TrainSpec, pred: Prediction) -> list[dict[str, str]]:
    """Rows of (component, formula with numbers, GiB, source)."""
    hooks = get_method(method.name).estimator
    n = pred.trainable_params
    t_dtype = hooks.trainable_dtype(method, train)
    tb = DTYPE_BYTES[t_dtype]
    pb = DTYPE_BYTES[train.param_dtype]
    c = pred.components
    b, s, v, L = train.micro_batch_size, train.seq_len, model.vocab_size, model.num_layers
    shard = f" / {train.num_gpus} GPUs ({train.sharding})" if train.sharding != "none" else ""
    state_b = train.optimizer.state_bytes_per_element or tb
    quantized = hooks.quantized_params(model, method)
    rows = [
        ("weights", f"frozen params {model.total_params - quantized:,} x {pb:g} B ({train.param_dtype})"
         if not hooks.trains_base else "0 (every weight is trainable)",
         "parameter count from the HF config (transformers on meta, tests/test_catalog.py)"),
        ("quantized_weights", "per matrix: ceil(n/2) codes + ceil(n/64) absmax codes + 4 ceil(n/64/256) + 4 B"
         if quantized else "0 (no 4-bit weights)", "NF4 + double quant, Dettmers et al. 2023 Sec. 3 (docs/SOURCES.md#nf4)"),
        ("trainable", f"{n:,} trainable x {tb:g} B ({t_dtype}){shard}", _trainable_source(method.name)),
        ("gradients", f"{n:,} x {tb:g} B at the {pred.phase} peak" if c['gradients'] else
         "0: no gradient exists yet at the peak (start of backward)", "a gradient has its parameter's dtype (docs/SOURCES.md#derivatives-yaml)"),
        ("optimizer", f"{train.optimizer.states_per_param} states x {n:,} x {state_b:g} B ({train.optimizer.name}){shard}",
         "AdamW keeps m and v, Loshchilov & Hutter 2019 (docs/SOURCES.md#adamw); 8-bit: docs/SOURCES.md#bnb-8bit-optim"),
        ("master_weights", f"4 B x {n:,}" if c["master_weights"] else "0 (no separate fp32 master copy)",
         "mixed precision, Micikevicius et al. 2018 (docs/SOURCES.md#mixed-precision)"),
        ("activations", _activation_formula(model, method, train, hooks),
         "symbolic autograd walk of the layer (lorabench.memory.activations), save rules: docs/SOURCES.md#derivatives-yaml"),
        ("logits", f"log_softmax fp32 b*s*V = {b}x{s}x{v} x 4 B, + 2 gradient buffers in backward",
         "transformers ForCausalLMLoss upcasts logits (docs/SOURCES.md#hf-loss)"),
        ("cuda_context", f"{calibration()['cuda_context_bytes']:,} B",
         f"{calibration()['source']} (docs/SOURCES.md#cuda-context)"),
        ("allocator_slack", f"max({calibration()['allocator_slack_fraction']} x allocated, "
         f"{calibration()['allocator_slack_min_bytes']:,} B)",
         f"{calibration()['source']} (docs/SOURCES.md#allocator)"),
    ]
    return [{"component": name, "formula": formula, "GiB": gib(c[name], 3), "source": src}
            for name, formula, src in rows]


def _trainable_source(method_name: str) -> str:
    anchor = get_method(method_name).sources_anchor
    if not anchor:
        return "every parameter of the model trains"
    return f"{method_name} trainable-parameter formula (docs/SOURCES.md#{anchor})"


def _activation_formula(model: ModelSpec, method: MethodConfig, train: TrainSpec, hooks: Estimator) -> str:
    """Per-layer saved bytes from the symbolic walk, with the numbers filled in."""
    from lorabench.memory import activations as act

    ctx = act.layer_ctx(model, method, train, hooks)
    first = act.layer_memory(ctx, hooks.trains_base)
    rest = act.layer_memory(ctx, first.output_requires_grad)
    mib = 1024**2
    L = model.num_layers
    if train.gradient_checkpointing:
        return (f"{L} layer inputs x {act.checkpoint_saved_bytes(ctx) / mib:.1f} MiB + one recomputed layer "
                f"({rest.saved_bytes / mib:.1f} MiB saved, {rest.backward_peak_bytes / mib:.1f} MiB at its backward peak)")
    return (f"layer 0 saves {first.saved_bytes / mib:.1f} MiB + {L - 1} layers x {rest.saved_bytes / mib:.1f} MiB "
            f"(b={train.micro_batch_size}, s={train.seq_len}, {train.precision})")

