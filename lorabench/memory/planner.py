"""The analytic planner: predict(), fits(), max_micro_batch(), max_seq_len() (torch-free, instant).

Peak memory of a training step is the largest of three moments (the same phases the tracker reports):

* backward start (phase ``backward``): static state + every tensor the forward saved + the loss
  backward's buffers (Korthikanti et al. 2022 call these "activations"; here they come from
  :mod:`lorabench.memory.activations`);
* end of backward (phase ``backward``): static state + all gradients (+ the accumulation transient of a
  trained tied embedding);
* optimizer step (phase ``optimizer``): static state + gradients + the step's temporaries, the
  ``optimizer_temp`` component (foreach AdamW holds one extra copy of a state: ``sqrt(v)``; see
  :mod:`lorabench.memory.optimizer_step`).

Static state = frozen weights + NF4 weights + trainable weights + optimizer states (+ fp32 master weights).
Multi-GPU (``num_gpus`` > 1) follows torch's implementations rank by rank (:mod:`lorabench.memory.sharding`):
DDP's gradient buckets, ZeRO-1's partitioned optimizer, FSDP2's shards, all-gathered layers and
reduce-scatter buffers; two more moments then compete: the bottom layer's and the root's reduce-scatter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any

from lorabench.catalog import CONF_DIR, _load_yaml
from lorabench.memory import activations as act
from lorabench.memory import sharding as sh
from lorabench.memory.categories import PLANNER_COMPONENTS
from lorabench.memory.labelled import part, parts_of
from lorabench.memory.load import load_components
from lorabench.memory.optimizer_step import step_temporary_bytes, tied_embedding_transient_bytes
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
    parts: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict, compare=False)
    """Each component at the peak as the labelled terms the planner summed (what ``--explain`` prints)."""
    peak_moment: str = ""
    """The candidate moment that is the peak (``backward_top_layer``, ``optimizer``, ``load``...)."""

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
                         hooks: Estimator, done_grad_div: int = 1) -> list[tuple[int, int, int]]:
    """(activations, logits, parameter gradients) bytes at the candidate peaks of backward.

    1. the loss backward: everything the forward saved + log-softmax and its two gradient buffers;
    2. the top decoder layer's backward: the layers below still hold their saved tensors (or, with
       checkpointing, every layer keeps its input and the top layer is recomputed), plus the replayed
       backward peak of that layer (:meth:`Graph.backward_peak`);
    3. the bottom layer's backward: activations are nearly all freed, but every layer above has created
       its parameter gradients (the peak moves here when gradients outweigh activations per layer);
    4. with checkpointing, the top layer's recomputed forward: its temporaries at their fullest plus the
       gradient already waiting at its output;
    5. the second layer from the bottom (the lowest whose input needs grad, which layer 0's does not): its
       backward, and with checkpointing its recomputed forward, before its own parameter gradients exist.
    Between 2 and 3 live bytes change linearly layer by layer, so the extremes bound every layer.
    ``done_grad_div``: finished layers keep 1/N of their gradients (FSDP's reduce-scatter), else 1.
    """
    ctx = act.layer_ctx(model, method, train, hooks)
    first = act.layer_memory(ctx, hooks.trains_base or train.prepare_kbit)  # trainable embeddings make every hidden state need grad
    rest = act.layer_memory(ctx, first.output_requires_grad) if model.num_layers > 1 else first
    n = model.num_layers
    head = part("final norm + lm_head: saved tensors", act.head_saved_bytes(ctx, rest.output_requires_grad))
    logits_bwd = part(f"logits: fp32 log_softmax output + 2 gradient buffers (3 x b*s*V x 4 B)", act.logits_peak_bytes(ctx))
    # When the top layer's backward runs, the head's parameter gradients already exist (full FT).
    head_grads = part("lm_head + final norm gradients", _head_grad_bytes(model, train, hooks))
    top_grads = head_grads + part("top layer's parameter gradients", rest.backward_peak_param_grad_bytes)
    bottom_grads = (head_grads + part(f"{n - 1} layers' parameter gradients",
                                      sh.ceil_div((n - 1) * rest.param_grad_bytes, done_grad_div))
                    + part("layer 0's parameter gradients so far", first.backward_peak_param_grad_bytes))
    kept_grads = part(f"activation gradients kept by {n - 1} layers above",
                      (n - 1) * hooks.persistent_gradient_bytes(ctx))
    # The second layer from the bottom: the lowest of the `rest` layers (its input needs grad, unlike layer 0's).
    # With two layers it is the top layer, whose own candidate above holds no layer above it.
    second_above = head_grads + part(f"{max(n - 2, 0)} layers' parameter gradients",
                                     sh.ceil_div(max(n - 2, 0) * rest.param_grad_bytes, done_grad_div))
    second_grads = second_above + part("layer 1's parameter gradients so far", rest.backward_peak_param_grad_bytes)
    second_kept = part(f"activation gradients kept by {max(n - 2, 0)} layers above",
                       max(n - 2, 0) * hooks.persistent_gradient_bytes(ctx))
    bwd_peak = part("one layer's replayed backward peak", rest.backward_peak_bytes)
    fwd_peak = part("one layer's forward peak (saved + temporaries)", rest.forward_peak_bytes)
    first_bwd = part("layer 0's replayed backward peak", first.backward_peak_bytes)
    if train.gradient_checkpointing:
        ckpt_b = act.checkpoint_saved_bytes(ctx)
        ckpt = part(f"checkpointed layer input ({ckpt_b:,} B)", ckpt_b)
        all_ckpt = part(f"{n} checkpointed layer inputs x {ckpt_b:,} B", n * ckpt_b)
        incoming = part("gradient waiting at the recomputed layer's output", act.incoming_gradient_bytes(ctx))
        recompute = all_ckpt + fwd_peak + incoming
        top = max(all_ckpt + bwd_peak, recompute)
        # Its recompute has the gradient from the layer above waiting at its output; its backward replay starts
        # from that gradient already (counting it again over-predicted prefix tuning by up to 1.46% in the grid).
        two = part(f"2 checkpointed layer inputs x {ckpt_b:,} B", 2 * ckpt_b)
        second = [(two + second_kept + bwd_peak, 0, second_grads),
                  (two + second_kept + fwd_peak + incoming, 0, second_above)] if n > 2 else []
        return [(all_ckpt + head, logits_bwd, 0), (top, 0, top_grads),
                (ckpt + kept_grads + first_bwd, 0, bottom_grads), *second]
    saved0 = part(f"layer 0: saved tensors ({first.saved_bytes:,} B)", first.saved_bytes)
    below_top = saved0 + part(f"{n - 2} layers x {rest.saved_bytes:,} B saved", (n - 2) * rest.saved_bytes) if n > 1 else 0
    # The top layer's own forward (its temporaries on top of everything saved below) can exceed both.
    top = max(below_top + bwd_peak, below_top + fwd_peak)
    second = [(saved0 + second_kept + bwd_peak, 0, second_grads)] if n > 2 else []
    saved_all = saved0 + part(f"{n - 1} layers x {rest.saved_bytes:,} B saved", (n - 1) * rest.saved_bytes)
    return [(saved_all + head, logits_bwd, 0), (top, 0, top_grads), (kept_grads + first_bwd, 0, bottom_grads), *second]


def _head_grad_bytes(model: ModelSpec, train: TrainSpec, hooks: Any) -> int:
    """Gradients of lm_head and the final norm, created before any decoder layer's backward (full FT)."""
    head = (model.lm_head_params or model.vocab_size * model.hidden_size) + model.final_norm_params
    return int(head * DTYPE_BYTES[train.param_dtype]) if hooks.trains_base else 0


def _forward_logits_bytes(model: ModelSpec, train: TrainSpec) -> int:
    """Logits at the end of the forward: the compute-dtype logits, their fp32 copy (the same tensor in fp32)
    and log_softmax's fp32 output; the backward's third fp32 buffer does not exist yet
    (:func:`lorabench.memory.activations.logits_peak_bytes`)."""
    tv = train.micro_batch_size * train.seq_len * model.vocab_size
    e = DTYPE_BYTES[train.compute_dtype]
    return int((e if e < 4 else 0) * tv + 2 * 4 * tv)


def _zero1_share(model: ModelSpec, method: MethodConfig, train: TrainSpec, hooks: Any, n_train: int) -> float | None:
    """The largest rank's share of the optimizer states under zero1 (None: not zero1, or an even split of
    a method's many small tensors, which the greedy partition balances to within a few elements)."""
    if train.sharding != "zero1" or sh.world(train) == 1:
        return None
    numels = sh.base_tensor_numels(model) if hooks.trains_base else hooks.trainable_tensor_numels(model, method)
    return sh.zero1_largest_share(numels, sh.world(train)) if numels else None


def _final_hidden_bytes(model: ModelSpec, train: TrainSpec, hooks: Any) -> int:
    """The final norm's output, still referenced by the causal LM's forward while it computes the loss;
    a trained lm_head saves it anyway (counted among the saved tensors)."""
    return 0 if hooks.trains_base else int(train.micro_batch_size * train.seq_len * model.hidden_size
                                           * DTYPE_BYTES[train.param_dtype])


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
    full = {"weights": weights, "quantized_weights": quantized, "trainable": t_bytes, "gradients": t_bytes,
            "optimizer": opt, "master_weights": master}
    base = sh.shard_state(full, train, _zero1_share(model, method, train, hooks, n_train))
    static = {k: base[k] for k in ("weights", "quantized_weights", "trainable", "optimizer", "master_weights")}
    largest = hooks.largest_trainable_params(model, method)
    opt_temp = step_temporary_bytes(train.optimizer, train.adamw_impl, base["optimizer"],
                                    int(largest * (state_b if state_b is not None else DTYPE_BYTES[t_dtype])))
    tied = part("tied embedding: its two gradients and their sum (2 extra x V x h)",
                tied_embedding_transient_bytes(model.vocab_size, model.hidden_size, DTYPE_BYTES[t_dtype],
                                               hooks.trains_base and model.tie_word_embeddings))
    opt_temp = part(f"{train.adamw_impl} AdamW step temporary" if train.optimizer.name == "adamw" else "step temporary",
                    opt_temp)
    all_grads = part(f"all gradients: {n_train:,} x {DTYPE_BYTES[t_dtype]:g} B ({t_dtype})", base["gradients"])
    fsdp, n = sh.is_fsdp(train), sh.world(train)
    loss_peak, top_peak, bottom_peak, *second_peaks = _backward_candidates(model, method, train, hooks,
                                                                           n if fsdp else 1)
    groups = sh.fsdp_groups(model, weights, t_bytes, hooks.trains_base,
                            int(hooks.root_trainable_params(model, method) * DTYPE_BYTES[t_dtype]),
                            DTYPE_BYTES[train.param_dtype])
    bucket = part("DDP gradient buckets", sh.ddp_bucket_bytes(train, t_bytes))
    kept = sh.kept_all_gather_bytes(groups, train)

    def moment(moment_name: str, activations: int, logits: int, grads: int, temp: int = 0) -> dict[str, int]:
        frozen, trainable = sh.gathered_bytes(groups, train, moment_name, model.num_layers)
        # Unsharded gradients exist beside FSDP's shards; one device (or DDP) holds at most all of them.
        grads = grads if fsdp else min(grads, base["gradients"])
        return dict(static, weights=static["weights"] + part("all-gathered weights", frozen),
                    trainable=static["trainable"] + part("all-gathered trainable weights", trainable),
                    gradients=grads + bucket, optimizer_temp=temp, activations=activations, logits=logits)

    candidates = {
        "backward": moment("loss", loss_peak[0], loss_peak[1], 0),
        "backward_top_layer": moment("top", top_peak[0], 0, top_peak[2]),
        "backward_bottom_layer": moment("bottom", bottom_peak[0], 0,
                                        bottom_peak[2] + sh.retained_reduce_input_bytes(groups, train, model.num_layers)),
        **{f"backward_second_layer_{i}": moment("bottom", acts, 0, grads)
           for i, (acts, _, grads) in enumerate(second_peaks)},
        "backward_end": moment("end", tied, 0, all_grads),
        "optimizer": moment("optimizer", 0, 0, all_grads, temp=opt_temp),
    }
    if fsdp:
        # The forward's end (the loss runs inside the root's forward) still holds the top layer's flat
        # all-gather output; the loss backward frees it and adds one fp32 b*s*V gradient instead.
        candidates["forward_loss"] = moment("forward", loss_peak[0] + kept + _final_hidden_bytes(model, train, hooks),
                                            _forward_logits_bytes(model, train), 0)
        bottom_rs, root_rs = sh.reduce_scatter_moments(groups, train, model.num_layers,
                                                       _head_grad_bytes(model, train, hooks))
        candidates["backward_reduce_bottom"] = moment("reduce", 0, 0, bottom_rs)
        candidates["backward_reduce_root"] = moment("end", 0, 0, root_rs)
    if train.num_gpus == 1:  # each rank of a sharded run loads its own shard (not modelled)
        candidates["load"] = load_components(model, method, train, hooks, weights, quantized, t_bytes)
    totals = {k: sum(v.values()) for k, v in candidates.items()}
    phase = max(totals, key=lambda k: totals[k])
    comps = {c: 0 for c in PLANNER_COMPONENTS}
    comps.update(candidates[phase])
    parts = {c: parts_of(v) for c, v in comps.items()}
    comps = {c: int(v) for c, v in comps.items()}
    cal = calibration(gpu.name if gpu else None)
    allocated = sum(comps.values())
    comps["allocator_slack"] = int(max(cal["allocator_slack_fraction"] * allocated, cal["allocator_slack_min_bytes"]))
    comps["cuda_context"] = int(cal["cuda_context_bytes"])
    spill = comps["optimizer"] if train.optimizer.paged else 0
    return Prediction(components=comps, phase=phase if phase in ("optimizer", "load") else "backward",
                      trainable_params=n_train, total_params=model.total_params,
                      host_bytes=spill, spillable_bytes=spill, phase_peaks=totals, state_bytes=base,
                      peak_moment=phase, parts={**parts, "allocator_slack": (("", comps["allocator_slack"]),),
                             "cuda_context": (("", comps["cuda_context"]),)})


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
