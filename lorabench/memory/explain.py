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
    frozen = f"frozen params {model.total_params - quantized:,} x {pb:g} B ({train.param_dtype})"
    if train.norm_param_dtype != train.param_dtype:
        norms = model.params_by_kind()["norms"]
        frozen = (f"frozen params {model.total_params - quantized - norms:,} x {pb:g} B ({train.param_dtype}) + "
                  f"norms {norms:,} x {DTYPE_BYTES[train.norm_param_dtype]:g} B ({train.norm_param_dtype})")
    rows = [
        ("weights", frozen if not hooks.trains_base else "0 (every weight is trainable)",
         "parameter count from the HF config (transformers on meta, tests/test_catalog.py)"),
        ("quantized_weights", "per matrix: ceil(n/2) codes + ceil(n/64) absmax codes + 4 ceil(n/64/256) + 4 B"
         if quantized else "0 (no 4-bit weights)", "NF4 + double quant, Dettmers et al. 2023 Sec. 3 (docs/SOURCES.md#nf4)"),
        ("trainable", f"{n:,} trainable x {tb:g} B ({t_dtype}){shard}", _trainable_source(method.name)),
        ("gradients", "0: no gradient exists yet at this moment of backward",
         "a gradient has its parameter's dtype (docs/SOURCES.md#derivatives-yaml)"),
        ("optimizer", f"{train.optimizer.states_per_param} states x {n:,} x {state_b:g} B ({train.optimizer.name}){shard}",
         "AdamW keeps m and v, Loshchilov & Hutter 2019 (docs/SOURCES.md#adamw); 8-bit: docs/SOURCES.md#bnb-8bit-optim"),
        ("master_weights", f"4 B x {n:,}" if c["master_weights"] else "0 (no separate fp32 master copy)",
         "mixed precision, Micikevicius et al. 2018 (docs/SOURCES.md#mixed-precision)"),
        ("optimizer_temp", "0: the peak is not in the optimizer step",
         "torch AdamW foreach/fused/for-loop temporaries (docs/SOURCES.md#torch-adamw)"),
        ("activations", "0: nothing saved for backward is alive at this moment",
         "symbolic autograd walk of the layer (lorabench.memory.activations), save rules: docs/SOURCES.md#derivatives-yaml"),
        ("logits", "0: the logits are freed at this moment",
         "transformers ForCausalLMLoss upcasts logits (docs/SOURCES.md#hf-loss)"),
        ("cuda_context", f"{calibration()['cuda_context_bytes']:,} B",
         f"{calibration()['source']} (docs/SOURCES.md#cuda-context)"),
        ("allocator_slack", f"max({calibration()['allocator_slack_fraction']} x allocated, "
         f"{calibration()['allocator_slack_min_bytes']:,} B)",
         f"{calibration()['source']} (docs/SOURCES.md#allocator)"),
    ]
    return [{"component": name, "formula": _from_parts(pred, name) or _static(formula, c[name], pred),
             "GiB": gib(c[name], 3), "source": src} for name, formula, src in rows]


def _static(formula: str, value: int, pred: Prediction) -> str:
    """A persistent term's formula; a '0: ...' text only when the component is 0 at the peak."""
    return f"{value:,} B at the {pred.peak_moment} moment" if value and formula.startswith("0") else formula


def _from_parts(pred: Prediction, name: str) -> str:
    """The component as the planner summed it (its labelled terms), '' when it is one unlabelled term."""
    parts = pred.parts.get(name, ())
    if not any(label for label, _ in parts):
        return ""
    return " + ".join(f"{label or 'other'} {value / 1024**2:,.1f} MiB" for label, value in parts) + \
        f" (peak moment: {pred.peak_moment})"


def _trainable_source(method_name: str) -> str:
    anchor = get_method(method_name).sources_anchor
    if not anchor:
        return "every parameter of the model trains"
    return f"{method_name} trainable-parameter formula (docs/SOURCES.md#{anchor})"
