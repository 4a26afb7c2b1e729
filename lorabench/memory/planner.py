"""The analytic planner: predict(), fits(), max_micro_batch(), max_seq_len() (torch-free, instant).

Peak memory of a training step is the largest of three moments (the same phases the tracker reports):

* backward start (phase ``backward``): static state + every tensor the forward saved + the loss
  backward's buffers (Korthikanti et al. 2022 call these "activations"; here they come from
  :mod:`lorabench.memory.activations`);
* end of backward (phase ``backward``): static state + all gradients;
* optimizer step (phase ``optimizer``): static state + gradients + the step's temporaries (foreach AdamW
  holds one extra copy of a state: ``sqrt(v)``).

Static state = frozen weights + NF4 weights + trainable weights + optimizer states (+ fp32 master weights).
Sharding (Rajbhandari et al. 2020, ZeRO, arXiv:1910.02054, Fig. 1): ZeRO-1 divides optimizer states
(and master weights) by N, ZeRO-2 also gradients, ZeRO-3/FSDP also the weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any

from lorabench.catalog import CONF_DIR, _load_yaml
from lorabench.memory import activations as act
from lorabench.memory.categories import PLANNER_COMPONENTS
from lorabench.methods import get as get_method
from lorabench.methods.base import MethodConfig
from lorabench.methods.protocols import Estimator
from lorabench.specs import DTYPE_BYTES, GpuSpec, ModelSpec, TrainSpec
from lorabench.validation import SHARDINGS, validate_setup

@dataclass(frozen=True)
class Prediction:
    """Predicted per-GPU memory at the peak moment of a training step."""

    components: dict[str, int]
    phase: str
    trainable_params: int
    total_params: int
    host_bytes: int = 0
    spillable_bytes: int = 0
    phase_peaks: dict[str, int] = field(default_factory=dict)
    state_bytes: dict[str, int] = field(default_factory=dict)
    """Per-GPU bytes of the persistent terms (after sharding), whatever the peak phase."""

    @property
    def peak_allocated_bytes(self) -> int:
        """Tensor bytes (what ``torch.cuda.max_memory_allocated`` and the tracker measure)."""
        return sum(v for k, v in self.components.items() if k not in ("cuda_context", "allocator_slack"))

    @property
    def reserved_bytes(self) -> int:
        """Allocated + caching-allocator slack (``max_memory_reserved``)."""
        return self.peak_allocated_bytes + self.components["allocator_slack"]

    @property
    def device_bytes(self) -> int:
        """Reserved + CUDA context and workspaces (what nvidia-smi/pynvml shows)."""
        return self.reserved_bytes + self.components["cuda_context"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "components": dict(self.components),
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "reserved_bytes": self.reserved_bytes,
            "device_bytes": self.device_bytes,
            "host_bytes": self.host_bytes,
            "phase": self.phase,
            "phase_peaks": dict(self.phase_peaks),
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
        }


@dataclass(frozen=True)
class Verdict:
    fits: bool
    headroom_bytes: int


@functools.lru_cache(maxsize=None)
def calibration(gpu_name: str | None = None) -> dict[str, Any]:
    """Overhead terms: conf/calibration/<gpu>.yaml if fitted for that GPU, else default.yaml."""
    path = CONF_DIR / "calibration" / f"{gpu_name}.yaml"
    if gpu_name is None or not path.is_file():
        path = CONF_DIR / "calibration" / "default.yaml"
    return _load_yaml(path)


def validate(model: ModelSpec, method: MethodConfig, train: TrainSpec) -> None:
    """Raise UserError for an impossible or unsupported setting (:func:`lorabench.validation.validate_setup`)."""
    validate_setup(model, method, train, get_method(method.name).estimator)


def _backward_candidates(model: ModelSpec, method: MethodConfig, train: TrainSpec,
                         hooks: Estimator) -> list[tuple[int, int, int]]:
    """(activations, logits, parameter gradients) bytes at the candidate peaks of backward.

    1. the loss backward: everything the forward saved + log-softmax and its two gradient buffers;
    2. the top decoder layer's backward: the layers below still hold their saved tensors (or, with
       checkpointing, every layer keeps its input and the top layer is recomputed), plus the replayed
       backward peak of that layer (:meth:`Graph.backward_peak`);
    3. the bottom layer's backward: activations are nearly all freed, but every layer above has created
       its parameter gradients (the peak moves here when gradients outweigh activations per layer);
    4. with checkpointing, the top layer's recomputed forward: its temporaries at their fullest plus the
       gradient already waiting at its output.
    Between 2 and 3 live bytes change linearly layer by layer, so the extremes bound every layer.
    """
    ctx = act.layer_ctx(model, method, train, hooks)
    first = act.layer_memory(ctx, hooks.trains_base)  # trainable embeddings make every hidden state need grad
    rest = act.layer_memory(ctx, first.output_requires_grad) if model.num_layers > 1 else first
    head = act.head_saved_bytes(ctx, rest.output_requires_grad)
    logits_bwd = act.logits_peak_bytes(ctx)
    n = model.num_layers
    # When the top layer's backward runs, the head's parameter gradients already exist (full FT).
    head_grads = (model.lm_head_params or model.vocab_size * model.hidden_size) + model.final_norm_params
    head_grads = int(head_grads * DTYPE_BYTES[train.param_dtype]) if hooks.trains_base else 0
    top_grads = head_grads + rest.backward_peak_param_grad_bytes
    bottom_grads = head_grads + (n - 1) * rest.param_grad_bytes + first.backward_peak_param_grad_bytes
    kept_grads = (n - 1) * hooks.persistent_gradient_bytes(ctx)  # left alive by the layers above
    if train.gradient_checkpointing:
        ckpt = act.checkpoint_saved_bytes(ctx)
        recompute = n * ckpt + rest.forward_peak_bytes + act.incoming_gradient_bytes(ctx)
        top = max(n * ckpt + rest.backward_peak_bytes, recompute)
        return [(n * ckpt + head, logits_bwd, 0), (top, 0, top_grads), (ckpt + kept_grads + first.backward_peak_bytes, 0, bottom_grads)]
    below_top = first.saved_bytes + (n - 2) * rest.saved_bytes if n > 1 else 0
    # The top layer's own forward (its temporaries on top of everything saved below) can exceed both.
    top = max(below_top + rest.backward_peak_bytes, below_top + rest.forward_peak_bytes)
    return [(first.saved_bytes + (n - 1) * rest.saved_bytes + head, logits_bwd, 0),
            (top, 0, top_grads), (kept_grads + first.backward_peak_bytes, 0, bottom_grads)]


def _shard(components: dict[str, int], train: TrainSpec) -> dict[str, int]:
    n = train.num_gpus
    level = SHARDINGS.index(train.sharding)
    div = {"optimizer": 1, "master_weights": 1, "gradients": 2, "trainable": 3, "weights": 3, "quantized_weights": 3}
    return {k: (-(-v // n) if k in div and level >= div[k] else v) for k, v in components.items()}


def predict(model: ModelSpec, method: MethodConfig, train: TrainSpec, gpu: GpuSpec | None = None) -> Prediction:
    """Predict the per-GPU memory of one training step (the second, when optimizer state exists)."""
    validate(model, method, train)
    hooks = get_method(method.name).estimator
    weights, quantized = hooks.storage(model, method, train)
    n_train = hooks.trainable_params(model, method)
    t_dtype = hooks.trainable_dtype(method, train)
    t_bytes = int(n_train * DTYPE_BYTES[t_dtype])
    state_b = train.optimizer.state_bytes_per_element
    opt = int(train.optimizer.states_per_param * n_train * (state_b if state_b is not None else DTYPE_BYTES[t_dtype]))
    master = 4 * n_train if train.master_weights and t_dtype != "fp32" else 0
    base = _shard({"weights": weights, "quantized_weights": quantized, "trainable": t_bytes, "gradients": t_bytes,
                   "optimizer": opt, "master_weights": master}, train)
    gathered = 0
    if train.sharding == "zero3" and train.num_gpus > 1:
        # FSDP gathers one layer's full weights (and prefetches the next) around each layer's compute.
        gathered = 2 * int(model.layer_params() * DTYPE_BYTES[t_dtype if hooks.trains_base else train.param_dtype])
    static = {k: base[k] for k in ("weights", "quantized_weights", "trainable", "optimizer", "master_weights")}
    opt_temp = base["optimizer"] // max(train.optimizer.states_per_param, 1) if train.optimizer.states_per_param else 0
    loss_peak, top_peak, bottom_peak = _backward_candidates(model, method, train, hooks)
    candidates = {
        "backward": dict(static, gradients=0, activations=loss_peak[0] + gathered, logits=loss_peak[1]),
        "backward_top_layer": dict(static, gradients=min(top_peak[2], base["gradients"]),
                                   activations=top_peak[0] + gathered, logits=0),
        "backward_bottom_layer": dict(static, gradients=min(bottom_peak[2], base["gradients"]),
                                      activations=bottom_peak[0] + gathered, logits=0),
        "backward_end": dict(static, gradients=base["gradients"], activations=0, logits=0),
        "optimizer": dict(static, gradients=base["gradients"], activations=opt_temp, logits=0),
    }
    totals = {k: sum(v.values()) for k, v in candidates.items()}
    phase = max(totals, key=lambda k: totals[k])
    comps = {c: 0 for c in PLANNER_COMPONENTS}
    comps.update(candidates[phase])
    cal = calibration(gpu.name if gpu else None)
    allocated = sum(comps.values())
    comps["allocator_slack"] = int(max(cal["allocator_slack_fraction"] * allocated, cal["allocator_slack_min_bytes"]))
    comps["cuda_context"] = int(cal["cuda_context_bytes"])
    spill = comps["optimizer"] if train.optimizer.paged else 0
    return Prediction(components=comps, phase="optimizer" if phase == "optimizer" else "backward",
                      trainable_params=n_train, total_params=model.total_params,
                      host_bytes=spill, spillable_bytes=spill, phase_peaks=totals, state_bytes=base)


def fits(prediction: Prediction, gpu: GpuSpec) -> Verdict:
    """Fits when device bytes (minus states a paged optimizer can spill to the host) <= GPU memory."""
    need = prediction.device_bytes - prediction.spillable_bytes
    return Verdict(fits=need <= gpu.memory_bytes, headroom_bytes=gpu.memory_bytes - need)


def _largest(fn: Any, lo: int, hi: int) -> int:
    """Largest x in [lo, hi] with fn(x) true (fn monotone decreasing); 0 if none."""
    if not fn(lo):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fn(mid) else (lo, mid - 1)
    return lo


def max_micro_batch(model: ModelSpec, method: MethodConfig, train: TrainSpec, gpu: GpuSpec, limit: int = 4096) -> int:
    """Largest micro-batch that fits on ``gpu`` (0 if even 1 does not)."""
    return _largest(lambda b: fits(predict(model, method, replace(train, micro_batch_size=b), gpu), gpu).fits, 1, limit)


def max_seq_len(model: ModelSpec, method: MethodConfig, train: TrainSpec, gpu: GpuSpec) -> int:
    """Longest sequence that fits on ``gpu`` at the configured micro-batch (0 if none)."""
    limit = model.max_position_embeddings or 1 << 20
    return _largest(lambda s: fits(predict(model, method, replace(train, seq_len=s), gpu), gpu).fits, 1, limit)
