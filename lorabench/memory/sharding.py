"""Per-rank memory of data-parallel training as torch's implementations hold it (torch-free).

ZeRO (Rajbhandari et al. 2020, arXiv:1910.02054, Fig. 1) names the stages: ZeRO-1 partitions optimizer
states, ZeRO-2 also gradients, ZeRO-3 also parameters. lorabench runs them with torch's own code
(:mod:`lorabench.runtime.distributed`) and predicts what that code keeps alive on each rank:

* ``none`` (N > 1): DDP. Full replicas plus the reducer's gradient buckets, one flat copy of every
  trainable gradient (``gradient_as_bucket_view=False``, torch's default), alive for the whole run.
* ``zero1``: DDP + ``ZeroRedundancyOptimizer``: each rank keeps the optimizer states (and the foreach
  step's ``sqrt(v)`` temporary) of whole parameters, dealt largest first to the rank with the fewest
  elements so far (:func:`zero1_largest_share`); gradients, buckets and parameters replicated.
* ``zero2``/``zero3``: FSDP2 ``fully_shard`` per decoder layer and at the root. Every parameter, frozen ones
  included, is stored as a 1/N shard (dim 0 padded to a multiple of N); buffers (RoPE tables, QLoRA's NF4
  codes and constants, which lorabench keeps as buffers) are replicated. Around compute a group's full
  parameters are all-gathered into buffers beside the shards:

  - the root group (embeddings, final norm, lm_head, prefix parameters) stays gathered from its forward
    to the end of backward (FSDP2 does not reshard the root after forward);
  - zero3 gathers one layer in forward, and in backward the current layer plus the next one, which FSDP2
    prefetches (all-gathered at the current layer's pre-backward; the root's pre-backward prefetches the
    top layer, so the loss backward already holds it);
  - zero2 (``reshard_after_forward=False``) keeps every layer gathered from its forward to its own
    post-backward.

  The flat all-gather output of the last group gathered in forward (the top layer) is kept for its
  copy-out to overlap the next all-gather (``comm_ctx.all_gather_state``) until the root's post-forward,
  i.e. through the loss, which transformers computes inside the root's forward. A prefetched layer in
  backward is held as its flat all-gather output (one layer's bytes) until its own pre-backward.

  Gradients accumulate unsharded in the gathered parameters' ``.grad``; each group's post-backward then
  reduce-scatters them (an input copy of the same bytes plus the 1/N output that becomes the sharded
  grad), so a finished layer holds 1/N of its gradients. The last reduce-scatter input is retained until
  the next group's post-backward (``reduce_scatter_states``, at most one by default), so the layer below
  computes its backward beside it. Optimizer states are allocated like the sharded params.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.specs import ModelSpec, TrainSpec

FSDP_SHARDINGS: tuple[str, ...] = ("zero2", "zero3")


def world(train: TrainSpec) -> int:
    """Ranks that actually share the work (1 when the job runs on one device, whatever ``sharding`` says)."""
    return train.num_gpus if train.num_gpus > 1 else 1


def is_fsdp(train: TrainSpec) -> bool:
    return world(train) > 1 and train.sharding in FSDP_SHARDINGS


def is_ddp(train: TrainSpec) -> bool:
    return world(train) > 1 and train.sharding in ("none", "zero1")


def ceil_div(value: int, n: int) -> int:
    return -(-value // n)


def zero1_largest_share(tensor_numels: list[int], n: int) -> float:
    """The largest fraction of trainable elements any rank gets from ``ZeroRedundancyOptimizer``'s
    partition: parameters sorted by size, largest first, each to the rank with the fewest elements so far
    (torch/distributed/optim/zero_redundancy_optimizer.py, ``_partition_parameters``)."""
    sizes = [0] * n
    for numel in sorted(tensor_numels, reverse=True):
        sizes[sizes.index(min(sizes))] += numel
    total = sum(sizes)
    return max(sizes) / total if total else 1 / n


def shard_state(components: dict[str, int], train: TrainSpec, zero1_share: float | None = None) -> dict[str, int]:
    """Per-rank persistent state: ZeRO-1 keeps ``zero1_share`` (default 1/N) of the optimizer states and
    master weights; FSDP2 (zero2/zero3) 1/N of those, of the gradients and of the trainable and frozen
    16/32-bit weights (not the NF4 buffers)."""
    n = world(train)
    if n == 1:
        return dict(components)
    out = dict(components)
    if train.sharding == "zero1":
        share = zero1_share if zero1_share is not None else 1 / n
        for k in ("optimizer", "master_weights"):
            out[k] = int(round(components[k] * share)) if share != 1 / n else ceil_div(components[k], n)
    if is_fsdp(train):
        for k in ("optimizer", "master_weights", "gradients", "trainable", "weights"):
            out[k] = ceil_div(components[k], n)
    return out


def base_tensor_numels(model: ModelSpec) -> list[int]:
    """Element counts of every parameter tensor of the model (full fine-tuning's trainable tensors):
    embeddings, each layer's weights and biases, norms (one tensor per hidden-size vector), lm_head."""
    h = model.hidden_size
    layer = [m.weight_params for m in model.matrices] + [m.bias_params for m in model.matrices if m.bias]
    layer += [h] * (model.norm_params_per_layer // h)
    tensors = [model.vocab_size * h] + ([model.position_embedding_params] if model.position_embedding_params else [])
    tensors += layer * model.num_layers + [h] * (model.final_norm_params // h)
    return tensors + ([model.lm_head_params] if model.lm_head_params else [])


@dataclass(frozen=True)
class FsdpGroups:
    """Bytes FSDP2 all-gathers per group: one decoder layer, and the root (everything outside the layers).

    Attributes:
        layer_frozen, layer_trainable: one decoder layer's frozen / trainable parameters (full size).
        root_frozen, root_trainable: the root group's parameters (embeddings, final norm, lm_head, and
            trainable parameters a method keeps outside the layers, such as a prefix).
    """

    layer_frozen: int
    layer_trainable: int
    root_frozen: int
    root_trainable: int

    @property
    def layer(self) -> int:
        return self.layer_frozen + self.layer_trainable

    @property
    def root(self) -> int:
        return self.root_frozen + self.root_trainable


def fsdp_groups(model: ModelSpec, weights_bytes: int, trainable_bytes: int, trains_base: bool,
                root_trainable_bytes: int, param_bytes: float) -> FsdpGroups:
    """Split the frozen 16/32-bit weights and the trainable bytes into the per-layer and root groups.

    Outside the layers sit the embeddings, the final norm and an untied lm_head (frozen unless the method
    trains the base: then they are trainable); the rest of the frozen weights divides evenly over the layers.
    """
    outer = model.embedding_params + model.lm_head_params + model.final_norm_params
    root_frozen = 0 if trains_base else int(outer * param_bytes)
    root_trainable = int(outer * param_bytes) if trains_base else root_trainable_bytes
    n = model.num_layers
    return FsdpGroups(layer_frozen=(weights_bytes - root_frozen) // n,
                      layer_trainable=(trainable_bytes - root_trainable) // n,
                      root_frozen=root_frozen, root_trainable=root_trainable)


def gathered_layers(train: TrainSpec, moment: str, num_layers: int) -> int:
    """Decoder layers whose full parameters are gathered at ``moment`` (besides the root).

    Moments: ``forward`` (the forward's end), ``loss`` (backward start), ``top`` (top layer's backward or recompute), ``bottom`` (bottom layer's
    backward), ``reduce`` (a post-backward reduce-scatter), ``end``/``optimizer`` (none).
    """
    if not is_fsdp(train) or moment in ("end", "optimizer", "reduce"):
        return 0
    if train.sharding == "zero2":
        return num_layers if moment in ("forward", "loss", "top") else 1
    if moment == "forward":
        return 0
    if moment == "loss":  # the root's pre-backward prefetches the top layer (still a flat all-gather output)
        return 1
    return min(2, num_layers) if moment == "top" else 1


def gathered_bytes(groups: FsdpGroups, train: TrainSpec, moment: str, num_layers: int) -> tuple[int, int]:
    """(frozen, trainable) bytes all-gathered at ``moment`` (see :func:`gathered_layers`)."""
    if not is_fsdp(train):
        return 0, 0
    k = gathered_layers(train, moment, num_layers)
    root = moment not in ("end", "optimizer")
    return (k * groups.layer_frozen + (groups.root_frozen if root else 0),
            k * groups.layer_trainable + (groups.root_trainable if root else 0))


def reduce_scatter_moments(groups: FsdpGroups, train: TrainSpec, num_layers: int,
                           head_grad_bytes: int) -> tuple[int, int]:
    """Gradient bytes at the bottom layer's and at the root's post-backward reduce-scatter.

    A group's post-backward (after its parameters are resharded) holds its unsharded gradients, the
    reduce-scatter input (the same bytes) and the 1/N output that becomes its sharded gradient; the
    finished layers hold their 1/N shards. The bottom layer's runs while the root's unsharded gradients
    (``head_grad_bytes``) still wait; the root's own runs last.
    """
    n = world(train)
    done = ceil_div(groups.layer_trainable, n)
    bottom = (num_layers - 1) * done + 2 * groups.layer_trainable + done + head_grad_bytes
    root = num_layers * done + 2 * groups.root_trainable + ceil_div(groups.root_trainable, n)
    return bottom, root


def kept_all_gather_bytes(groups: FsdpGroups, train: TrainSpec) -> int:
    """The top layer's flat all-gather output, kept from its forward to the end of the root's forward."""
    return groups.layer if is_fsdp(train) else 0


def retained_reduce_input_bytes(groups: FsdpGroups, train: TrainSpec, num_layers: int) -> int:
    """The layer above's reduce-scatter input, alive while the bottom layer runs its backward."""
    return groups.layer_trainable if is_fsdp(train) and num_layers > 1 else 0


def ddp_bucket_bytes(train: TrainSpec, trainable_bytes: int) -> int:
    """DDP's gradient buckets: one flat copy of all trainable gradients, alive for the whole run."""
    return trainable_bytes if is_ddp(train) else 0
