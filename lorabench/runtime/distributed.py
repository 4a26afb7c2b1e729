"""One rank of a multi-device job, started by torch's launcher (:mod:`lorabench.runtime.dist_launch`)::

    python -m torch.distributed.run --nproc-per-node N ... -m lorabench.runtime.distributed \\
        --config-json PAYLOAD --out-dir DIR

Every rank builds the same model (same seed), wraps it for ``train.sharding`` and trains on its own
synthetic micro-batch (seed + rank: data parallel), measured by the same live-storage tracker as a
single-device CPU job (or the ``torch.cuda`` peaks on a GPU). Rank r writes ``DIR/rank<r>.json`` (the
single-device job's result shape, see :mod:`lorabench.runtime.job`); the parent merges the ranks.

Sharding as the implementations hold memory (torch's own, so nothing is emulated):

* ``none``: ``DistributedDataParallel`` (default ``gradient_as_bucket_view=False``: its gradient
  buckets, one flat copy of every trainable gradient, live beside ``p.grad`` for the whole run);
* ``zero1``: DDP + ``ZeroRedundancyOptimizer`` (each rank keeps the optimizer states of the parameters
  the greedy largest-first partition gives it, then broadcasts its updated parameters);
* ``zero2``: FSDP2 ``fully_shard`` per decoder layer and at the root with ``reshard_after_forward=False``
  (parameters stay gathered from forward to backward; gradients and states are sharded);
* ``zero3``: the same with ``reshard_after_forward=True`` per layer (the root keeps FSDP2's default,
  which leaves the root's parameters gathered after forward).

FSDP2 frees and re-allocates its all-gather buffers with ``untyped_storage().resize_()``, which bypasses
the dispatcher: :func:`follow_fsdp_buffers` reports those resizes to the tracker and tags the gathered
parameters as weights (frozen or trainable like the parameter they unshard).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
from pathlib import Path
from typing import Any, Iterator

from lorabench.runtime import job

#: Environment variable carrying the process-group timeout (seconds) from the parent to the ranks.
TIMEOUT_ENV = "LORABENCH_DIST_TIMEOUT_S"


def backend_for(device: str) -> str:
    """nccl on CUDA, gloo on the CPU."""
    return "nccl" if device == "cuda" else "gloo"


def init_world(device: str) -> tuple[int, int]:
    """Join the process group torchrun set up (env://); return (rank, world size)."""
    import torch
    import torch.distributed as dist

    timeout_s = float(os.environ.get(TIMEOUT_ENV, "120"))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _tracked_hook(tracker: Any) -> Any:
    """A DDP comm hook that files each gradient bucket under ``gradients``, then all-reduces it as DDP's
    built-in hook does (divide by the world size, all-reduce in place)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP rejects annotations other than GradBucket
        if tracker is not None:
            tracker.track_tensor(bucket.buffer(), "gradients", op="ddp_bucket")
        return default_hooks.allreduce_hook(state, bucket)

    return hook


def wrap_model(model: Any, sharding: str, device: str, tracker: Any) -> Any:
    """Wrap ``model`` for ``sharding`` (see the module docstring); returns the module to train."""
    import torch
    import torch.distributed as dist

    from lorabench.runtime.build import decoder_layers, hf_model

    if sharding in ("none", "zero1"):
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.cuda.current_device()] if device == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids)
        ddp.register_comm_hook(dist.group.WORLD, _tracked_hook(tracker))
        return ddp
    from torch.distributed.fsdp import fully_shard

    reshard = sharding == "zero3"
    for layer in decoder_layers(hf_model(model)):
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(model, **({} if reshard else {"reshard_after_forward": False}))
    return model


def make_dist_optimizer(model: Any, train: Any, lr: float) -> Any:
    """The job's optimizer; under zero1 wrapped in ``ZeroRedundancyOptimizer`` (torch optimizers only)."""
    from lorabench.runtime.step import make_optimizer

    if train.sharding != "zero1":
        return make_optimizer(model.parameters(), train.optimizer, lr, impl=train.adamw_impl)
    import torch
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from lorabench.errors import require

    name = train.optimizer.name
    require(name in ("adamw", "sgd", "sgd_momentum"), f"zero1 shards torch optimizers only, not {name!r}",
            "use --optimizer adamw, or zero2/zero3")
    cls, kwargs = ((torch.optim.AdamW, {}) if name == "adamw"
                   else (torch.optim.SGD, {"momentum": 0.9 if name == "sgd_momentum" else 0.0}))
    params = [p for p in model.parameters() if p.requires_grad]
    impl = {"fused": True} if train.adamw_impl == "fused" else {"foreach": train.adamw_impl == "foreach"}
    return ZeroRedundancyOptimizer(params, optimizer_class=cls, lr=lr, **impl, **kwargs)


@contextlib.contextmanager
def follow_fsdp_buffers(tracker: Any) -> Iterator[None]:
    """While active, FSDP2's all-gather buffers are reported to ``tracker`` when created, re-allocated or
    freed (their storages are resized in place), tagged like the parameter they unshard."""
    if tracker is None:
        yield
        return
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    def category(fsdp_param: Any) -> str:
        return "weights_trainable" if fsdp_param.sharded_param.requires_grad else "weights_frozen"

    def wrap(original: Any) -> Any:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(self, *args, **kwargs)
            for tensor in self.all_gather_outputs:
                tracker.resync(tensor, category(self))
            return out
        return method

    names = ("init_all_gather_outputs", "alloc_all_gather_outputs", "free_unsharded_param")
    originals = {name: getattr(FSDPParam, name) for name in names}
    try:
        for name, original in originals.items():
            setattr(FSDPParam, name, wrap(original))
        yield
    finally:
        for name, original in originals.items():
            setattr(FSDPParam, name, original)


#: Set to any value to add the storages live at each rank's peak to its result (``peak_storages``).
DEBUG_PEAK_ENV = "LORABENCH_DEBUG_PEAK"


class RankMeasurement(job.Measurement):
    """:class:`lorabench.runtime.job.Measurement` for one rank: the model wrapped for its sharding."""

    def __init__(self, payload: dict[str, Any], spec: Any, method: Any, train: Any, rank: int) -> None:
        super().__init__(payload, spec, method, train)
        self.rank = rank
        self.first_step_peak_bytes: int | None = None

    def run(self) -> None:
        model, batch, optimizer = self.setup()
        with follow_fsdp_buffers(self.tracker):
            self.steps(model, batch, optimizer)

    def setup(self) -> tuple[Any, Any, Any]:
        """(wrapped model, this rank's batch, optimizer); on the CPU the tracker exists first, so the DDP
        comm hook can file the gradient buckets."""
        import torch

        from lorabench.runtime.build import count_trainable, prepare_model
        from lorabench.runtime.step import synthetic_batch

        cuda = self.device == "cuda"
        device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
        seed = int(self.config["seed"])
        model = prepare_model(self.spec, self.method, self.train, device=device, seed=seed)
        self.trainable_params = count_trainable(model)
        if not cuda:
            self.tracker = job.capped_tracker(self.cap_bytes)
            self.tracker.keep_peak_storages = bool(os.environ.get(DEBUG_PEAK_ENV))
        wrapped = wrap_model(model, self.train.sharding, self.device, self.tracker)
        batch = synthetic_batch(self.spec.vocab_size, self.train.micro_batch_size, self.train.seq_len,
                                device, seed + 1 + self.rank)
        optimizer = make_dist_optimizer(wrapped, self.train, float(self.payload["lr"]))
        if self.tracker is not None and hasattr(optimizer, "optim"):  # ZeroRedundancyOptimizer's local one
            self.tracker.track_optimizer(optimizer.optim)
        return wrapped, batch, optimizer

    def before_step(self, index: int) -> None:
        if index == 1:
            self._restart_peak(self.device == "cuda")

    def _restart_peak(self, cuda: bool) -> None:
        """Measure from step 2 on: the steady state the planner predicts. Step 1 (FSDP's lazy init, no
        optimizer state yet) can hold gloo buffers a little longer on a rank whose peer lags; its peak is
        kept as ``first_step_peak_bytes``."""
        import torch

        if cuda:
            self.first_step_peak_bytes = int(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        elif self.tracker is not None:
            self.first_step_peak_bytes = int(self.tracker.peak_bytes)
            self.tracker.reset_peak()


def run_rank(payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Measure this rank; returns (rank, result). Never raises for the run itself (status failed/oom)."""
    import torch
    import torch.distributed as dist

    from lorabench import records

    device = payload["config"]["device"]
    if payload.get("num_threads"):
        torch.set_num_threads(int(payload["num_threads"]))
    rank, world = init_world(device)
    result: dict[str, Any] = {"status": "failed", "measured": None, "traced": None, "error": None,
                              "env": records.environment(device), "rank": rank, "world_size": world}
    try:
        spec, method, train = job.specs_from_config(payload)
        run = RankMeasurement(payload, spec, method, train, rank)
    except Exception as err:
        result["error"] = job._one_line(err)
        return rank, result
    try:
        run.run()
        result["status"] = "ok"
    except (torch.OutOfMemoryError, job.MemoryCapExceeded) as err:
        result["status"], result["error"] = "oom", job._one_line(err)
    except Exception as err:
        result["status"] = "oom" if getattr(run.tracker, "cap_hit", False) else "failed"
        result["error"] = job._one_line(err)
        raise  # a failing rank must die so that torchrun stops the others (its log keeps the line)
    finally:
        result["measured"] = run.measured(torch, None)
        result["measured"]["first_step_peak_bytes"] = run.first_step_peak_bytes
        if run.tracker is not None and run.tracker.keep_peak_storages:
            result["measured"]["peak_storages"] = [
                [row.op, list(row.shape), str(row.dtype), row.nbytes, row.category, row.phase]
                for row in run.tracker.peak_storages()]
        if result["status"] == "ok" and result["measured"]["nan_loss"]:
            result["status"] = "nan"
    if dist.is_initialized():
        dist.destroy_process_group()
    return rank, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorabench.runtime.distributed",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config-json", required=True, help="payload JSON, or a path to a file holding it")
    parser.add_argument("--out-dir", required=True, help="folder where rank<r>.json is written")
    args = parser.parse_args(argv)
    job.watch_parent()  # torchrun gone (killed with the sweep): exit instead of waiting on a collective
    rank, result = run_rank(job.load_payload(args.config_json))
    job.write_json(Path(args.out_dir) / f"rank{rank}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
