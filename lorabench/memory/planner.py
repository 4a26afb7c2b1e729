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

import yaml

from lorabench.catalog import CONF_DIR
from lorabench.errors import require
from lorabench.memory import activations as act
from lorabench.memory.categories import PLANNER_COMPONENTS
from lorabench.methods import memory_module
from lorabench.methods.base import MethodConfig
from lorabench.specs import DTYPE_BYTES, GpuSpec, ModelSpec, TrainSpec

SHARDINGS = ("none", "zero1", "zero2", "zero3")


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
    with path.open() as fh:
        return dict(yaml.safe_load(fh))


def validate(model: ModelSpec, train: TrainSpec) -> None:
    """Raise UserError for impossible training settings."""
    require(train.micro_batch_size >= 1, f"micro-batch {train.micro_batch_size} must be >= 1", "pass --batch 1 or more")
    require(train.seq_len >= 1, f"sequence length {train.seq_len} must be >= 1", "pass --seq-len 512 for example")
    require(train.num_gpus >= 1, f"--gpus {train.num_gpus} must be >= 1", "pass --gpus 1 or more")
    require(train.sharding in SHARDINGS, f"sharding {train.sharding!r} is unknown", f"use one of {', '.join(SHARDINGS)}")
    require(train.grad_accum_steps >= 1, f"grad accumulation {train.grad_accum_steps} must be >= 1", "pass 1 or more")
    require(train.attention in ("sdpa", "eager"), f"attention {train.attention!r} is unknown", "use sdpa or eager")
    if model.position_embedding_params:
        limit = model.max_position_embeddings
        require(train.seq_len <= limit, f"seq_len {train.seq_len} exceeds {model.name}'s {limit} learned positions",
                f"pass --seq-len {limit} or less")


def _activation_bytes(model: ModelSpec, method: MethodConfig, train: TrainSpec, hooks: Any) -> tuple[int, int]:
    """(saved by the forward, extra at the peak of backward) for one GPU's micro-batch."""
    ctx = act.LayerCtx(model=model, train=train, method=method, hooks=hooks, tokens=train.tokens_per_step,
                       param_dtype=train.param_dtype, train_base=hooks.trains_base)
    first_rg = hooks.trains_base  # trainable embeddings make every hidden state require grad
    first, rg = act.layer_saved_bytes(ctx, first_rg)
    rest, rg_rest = act.layer_saved_bytes(ctx, rg) if model.num_layers > 1 else (0, rg)
    head = act.head_saved_bytes(ctx, rg_rest)
    logits_saved, logits_bwd = act.logits_bytes(ctx)
    if train.gradient_checkpointing:
        saved = model.num_layers * act.checkpoint_saved_bytes(ctx) + head + logits_saved
        # Backward recomputes one layer at a time: its saved tensors live on top of the checkpoints.
        recompute = max(first, rest)
        return saved, max(logits_bwd - logits_saved, recompute)
    saved = first + (model.num_layers - 1) * rest + head + logits_saved
    return saved, logits_bwd - logits_saved


def _shard(components: dict[str, int], train: TrainSpec) -> dict[str, int]:
    n = train.num_gpus
    level = SHARDINGS.index(train.sharding)
    div = {"optimizer": 1, "master_weights": 1, "gradients": 2, "trainable": 3, "weights": 3, "quantized_weights": 3}
    return {k: (-(-v // n) if k in div and level >= div[k] else v) for k, v in components.items()}


def predict(model: ModelSpec, method: MethodConfig, train: TrainSpec, gpu: GpuSpec | None = None) -> Prediction:
    """Predict the per-GPU memory of one training step (the second, when optimizer state exists)."""
    validate(model, train)
    hooks = memory_module(method.name)
    weights, quantized = hooks.storage(model, method, train)
    n_train = hooks.trainable_params(model, method)
    t_dtype = hooks.trainable_dtype(method, train)
    t_bytes = int(n_train * DTYPE_BYTES[t_dtype])
    state_b = train.optimizer.state_bytes_per_element
    opt = int(train.optimizer.states_per_param * n_train * (state_b if state_b is not None else DTYPE_BYTES[t_dtype]))
    master = 4 * n_train if train.master_weights and t_dtype != "fp32" else 0
    base = _shard({"weights": weights, "quantized_weights": quantized, "trainable": t_bytes, "gradients": t_bytes,
                   "optimizer": opt, "master_weights": master}, train)
    saved, bwd_extra = _activation_bytes(model, method, train, hooks)
    if train.sharding == "zero3" and train.num_gpus > 1:
        # FSDP gathers one layer's full weights (and prefetches the next) around each layer's compute.
        saved += 2 * int(model.layer_params() * DTYPE_BYTES[t_dtype if hooks.trains_base else train.param_dtype])
    static = {k: base[k] for k in ("weights", "quantized_weights", "trainable", "optimizer", "master_weights")}
    opt_temp = base["optimizer"] // max(train.optimizer.states_per_param, 1) if train.optimizer.states_per_param else 0
    candidates = {
        "backward": dict(static, gradients=0, activations=saved - _logits_part(model, train), logits=_logits_part(model, train) + bwd_extra),
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
    return Prediction(components=comps, phase="backward" if phase == "backward_end" else phase,
                      trainable_params=n_train, total_params=model.total_params,
                      host_bytes=spill, spillable_bytes=spill, phase_peaks=totals, state_bytes=base)


def _logits_part(model: ModelSpec, train: TrainSpec) -> int:
    """The fp32 log-softmax output the forward keeps (reported as the 'logits' component)."""
    ctx_tokens = train.tokens_per_step * model.vocab_size
    extra = 1 if model.hf_config.get("final_logit_softcapping") else 0
    return int(4 * ctx_tokens * (1 + extra) if DTYPE_BYTES[train.compute_dtype] == 4 else 4 * ctx_tokens + 2 * ctx_tokens * extra)


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
