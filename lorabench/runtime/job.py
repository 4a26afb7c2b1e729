"""One measured training run, in its own process: ``python -m lorabench.runtime.job --config-json P --out R``.

The sweep parent (:mod:`lorabench.sweep` via :mod:`lorabench.runtime.launch`) writes the payload and turns the
result into a record; this process only measures. Payload (JSON object, or a path to one)::

    {"config": <the record's config block>, "hf_config": {...}, "lr": float, "trace": bool,
     "num_threads": int | null, "sampler_hz": float, "gpu": {GpuSpec fields} | null}

Result (written atomically to ``--out``)::

    {"status": "ok" | "oom" | "failed" | "nan", "measured": {...} | null, "traced": {...} | null,
     "error": str | null, "env": {<lorabench.records.environment(device)>}}

What is measured (the record's ``measured`` block):

- CPU: the :class:`~lorabench.runtime.tracker.MemoryTracker` on real tensors over the warmup steps (at least
  two: the second is the first with optimizer state; its categorized peak is the CPU's exact tensor peak),
  peak RSS (``getrusage``), then step times and tokens/s of the timed steps, run without the tracker.
- GPU: an NVML sampler thread (:mod:`lorabench.runtime.probe`) started before CUDA is initialised, the
  ``torch.cuda`` allocated/reserved peaks and ``memory_stats()`` summary, step times (synchronized),
  tokens/s and MFU against the catalog GPU's dense bf16 peak.

Every step is the same step as the trace's (:func:`lorabench.runtime.step.train_steps`); the torch optimizers
run their multi-tensor (foreach) implementation on both devices, CUDA's default, so the CPU peak reproduces
the GPU's. One micro-batch is one optimizer step (``grad_accum_steps`` does not change the peak and is not
emulated). ``memory_cap_bytes`` caps GPU memory through ``set_per_process_memory_fraction``; on the CPU the
tracker raises :class:`MemoryCapExceeded` inside the dispatch mode the moment live tensor bytes pass the cap.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

from lorabench.runtime.process import current_rss_bytes, peak_rss_bytes, watch_parent

class MemoryCapExceeded(RuntimeError):
    """Live tensor bytes passed ``memory_cap_bytes`` on the CPU (reported as status ``oom``)."""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in (0, 100]): the smallest value with at least q% of values <= it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def step_stats(step_times_s: list[float], tokens_per_step: int) -> dict[str, float]:
    """Median and p90 step time, and tokens/s = tokens per step / median step time."""
    median = statistics.median(step_times_s)
    return {"step_time_s_median": median, "step_time_s_p90": percentile(step_times_s, 90),
            "tokens_per_s": tokens_per_step / median if median > 0 else float("nan")}


def untimed_steps(warmup_steps: int, tracked: bool) -> int:
    """Steps before the timed ones. With the CPU tracker these are the tracked steps: at least 2, because
    step 2 is the first with optimizer state (every later step repeats its allocations), so the tracker's
    peak is the run's peak; the timed steps then run untracked and CPU tokens/s does not pay for the
    tracker's per-op bookkeeping (several-fold on tiny models, see scripts/bench_sampler_overhead.py)."""
    return max(warmup_steps, 2) if tracked else warmup_steps


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:240] if text else ''}"


def load_payload(arg: str) -> dict[str, Any]:
    """The payload from a JSON string (starting with ``{``) or a path to a JSON file."""
    return json.loads(arg if arg.lstrip().startswith("{") else Path(arg).read_text())


def specs_from_config(payload: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(ModelSpec, MethodConfig, TrainSpec) from the payload, exactly as the parent composed them."""
    from lorabench.architectures import spec_from_hf_config
    from lorabench.methods import make_config
    from lorabench.specs import TrainSpec

    config = payload["config"]
    spec = spec_from_hf_config(payload["hf_config"], name=config["model"])
    knobs = {k: v for k, v in config["method"].items() if k != "method"}
    method = make_config(config["method"]["method"], knobs)
    return spec, method, TrainSpec.from_record(config["train"])


def capped_tracker(cap_bytes: int | None) -> Any:
    """A MemoryTracker; with a cap, one that raises :class:`MemoryCapExceeded` inside the dispatch mode."""
    from lorabench.runtime.tracker import MemoryTracker

    if cap_bytes is None:
        return MemoryTracker()

    class CappedTracker(MemoryTracker):
        """Checks live bytes after every op that runs under the mode (exact: no op can slip past the cap)."""

        cap_hit = False

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if self.current_bytes > cap_bytes:
                self.cap_hit = True
                raise MemoryCapExceeded(f"live tensor bytes {self.current_bytes} passed memory_cap_bytes="
                                        f"{cap_bytes} in {self.current_phase} ({func})")
            return out

    return CappedTracker()


class Measurement:
    """Runs the steps of one job and accumulates what a ``measured`` block holds (also after an OOM)."""

    def __init__(self, payload: dict[str, Any], spec: Any, method: Any, train: Any) -> None:
        self.payload, self.spec, self.method, self.train = payload, spec, method, train
        self.config = payload["config"]
        self.device = self.config["device"]
        self.cap_bytes = self.config.get("memory_cap_bytes")
        self.tracker: Any = None
        self.losses: list[float] = []
        self.step_times_s: list[float] = []
        self.build_s = 0.0  # model build (prepare_model), batch and optimizer construction
        self.steps_s = 0.0  # every step, untimed ones included
        self.trainable_params: int | None = None
        self.rss_before_model_bytes = current_rss_bytes()

    def run(self) -> None:
        """Build, then warmup + timed steps (losses and per-step times)."""
        self.steps(*self.setup())

    def setup(self) -> tuple[Any, Any, Any]:
        """(model, batch, optimizer) of this job, built on its device."""
        import torch

        from lorabench.runtime.build import count_trainable
        from lorabench.runtime.stacks import build_for_stack
        from lorabench.runtime.step import make_optimizer, synthetic_batch

        if self.device == "cuda" and self.cap_bytes is not None:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(self.cap_bytes / total, 1.0))
        seed = int(self.config["seed"])
        t_build = time.perf_counter()
        model = build_for_stack(self.spec, self.method, self.train, device=self.device, seed=seed)
        self.trainable_params = count_trainable(model)
        batch = synthetic_batch(self.spec.vocab_size, self.train.micro_batch_size, self.train.seq_len,
                                self.device, seed)
        optimizer = make_optimizer(model.parameters(), self.train.optimizer, float(self.payload["lr"]),
                                   impl=self.train.adamw_impl)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.build_s = time.perf_counter() - t_build
        return model, batch, optimizer

    def before_step(self, index: int) -> None:
        """Called before step ``index`` (0-based); a subclass may restart the peak there."""

    def steps(self, model: Any, batch: Any, optimizer: Any) -> None:
        """Warmup + timed steps; on the CPU the tracker (created here unless :meth:`setup` did) follows
        the untimed ones."""
        import torch

        from lorabench.runtime.step import autocast_dtype_for, train_steps

        cuda = self.device == "cuda"
        autocast = autocast_dtype_for(self.train)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.tracker is None:
            self.tracker = capped_tracker(self.cap_bytes)
        untimed = untimed_steps(int(self.config["warmup_steps"]), tracked=self.tracker is not None)
        for i in range(untimed + int(self.config["timed_steps"])):
            self.before_step(i)
            tracker = self.tracker if i < untimed else None
            t0 = time.perf_counter()
            self.losses += train_steps(model, batch, optimizer, 1, tracker=tracker, autocast_dtype=autocast,
                                       loss=self.train.loss)
            if cuda:
                torch.cuda.synchronize()
            self.steps_s += time.perf_counter() - t0
            if i >= untimed:
                self.step_times_s.append(time.perf_counter() - t0)
            elif i == untimed - 1 and self.tracker is not None:
                self.tracker.close()  # its counters stay; timed steps run without its per-op bookkeeping

    def measured(self, torch: Any, nvml: Any) -> dict[str, Any]:
        """The record's ``measured`` block from whatever the run got through."""
        from lorabench.runtime import probe

        cuda = self.device == "cuda"
        tokens = self.train.micro_batch_size * self.train.seq_len
        stats = step_stats(self.step_times_s, tokens) if self.step_times_s else {
            "step_time_s_median": None, "step_time_s_p90": None, "tokens_per_s": None}
        cuda_stats = probe.cuda_memory_summary(torch) if cuda else None
        finite = [x for x in self.losses if math.isfinite(x)]
        out: dict[str, Any] = {
            "tracker": self.tracker.to_dict() if self.tracker is not None else None,
            "torch_max_allocated_bytes": cuda_stats["max_allocated_bytes"] if cuda_stats else None,
            "torch_max_reserved_bytes": cuda_stats["max_reserved_bytes"] if cuda_stats else None,
            "nvml_peak_used_bytes": nvml.peak_used_bytes if nvml else None,
            "nvml_baseline_bytes": nvml.baseline_bytes if nvml else None,
            "nvml_process_peak_bytes": nvml.process_peak_bytes if nvml else None,
            "peak_rss_bytes": peak_rss_bytes(),
            **stats,
            "mfu": None,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None,
            "nan_loss": len(finite) != len(self.losses),
            # extras beyond the shared format (reports may ignore them)
            "step_times_s": self.step_times_s,
            "trainable_params": self.trainable_params,
            "rss_before_model_bytes": self.rss_before_model_bytes,
            "cuda_memory_stats": cuda_stats,
            "nvml": nvml.to_dict() if nvml else None,
            "flops_per_token": None,
            "build_s": self.build_s,
            "steps_s": self.steps_s,
        }
        gpu = self.payload.get("gpu")
        if stats["tokens_per_s"] and self.trainable_params is not None:
            from lorabench.methods import get as get_method

            estimator = get_method(self.method.name).estimator
            attended = self.train.seq_len + estimator.prefix_tokens(self.method)
            flops = probe.training_flops_per_token(self.spec, estimator.trains_base, self.trainable_params, attended)
            out["flops_per_token"] = flops
            if cuda and gpu:
                out["mfu"] = probe.model_flops_utilization(flops, stats["tokens_per_s"], gpu["bf16_flops_per_s"])
        return out


def _trace(spec: Any, method: Any, train: Any, device: str = "cuda") -> tuple[dict[str, Any] | None, str | None]:
    """The fake-tensor trace of the same config (``trace=true``) as ``device`` runs it, or (None, error)."""
    try:
        from lorabench.runtime.trace import trace

        return trace(spec, method, train, as_on_cuda=device == "cuda").to_dict(), None
    except Exception as err:
        return None, f"trace: {_one_line(err)}"


def run_payload(payload: dict[str, Any], env_path: Path | None = None) -> dict[str, Any]:
    """Measure one job; never raises (errors become status failed, OOMs status oom)."""
    from lorabench.runtime.probe import NvmlSampler

    device = payload["config"]["device"]
    sampler = NvmlSampler(float(payload.get("sampler_hz") or 200)).start() if device == "cuda" else None
    result: dict[str, Any] = {"status": "failed", "measured": None, "traced": None, "error": None, "env": {}}
    try:
        import torch

        from lorabench import records

        if payload.get("num_threads"):
            torch.set_num_threads(int(payload["num_threads"]))
        result["env"] = records.environment(device)
        if env_path is not None:
            write_json(env_path, result["env"])
        spec, method, train = specs_from_config(payload)
    except Exception as err:
        if sampler is not None:
            sampler.stop()
        result["error"] = _one_line(err)
        return result
    errors: list[str] = []
    t_trace = time.perf_counter()
    if payload.get("trace"):
        result["traced"], trace_error = _trace(spec, method, train, str(device))
        errors += [trace_error] if trace_error else []
    trace_s = time.perf_counter() - t_trace
    run = Measurement(payload, spec, method, train)
    try:
        run.run()
        result["status"] = "ok"
    except (torch.OutOfMemoryError, MemoryCapExceeded) as err:
        result["status"] = "oom"
        errors.append(_one_line(err))
    except Exception as err:
        if getattr(run.tracker, "cap_hit", False):  # the cap's exception surfaced wrapped (e.g. via autograd)
            result["status"] = "oom"
        errors.append(_one_line(err))
        if result["status"] == "failed":
            traceback.print_exc()
    nvml = sampler.stop() if sampler is not None else None
    try:
        result["measured"] = {**run.measured(torch, nvml), "trace_s": trace_s}
    except Exception as err:
        errors.append(f"measure: {_one_line(err)}")
    if result["status"] == "ok" and result["measured"] and result["measured"]["nan_loss"]:
        result["status"] = "nan"
    result["error"] = "; ".join(errors) or None
    return result


def write_json(path: Path, obj: Any) -> None:
    """Write atomically: a temp file in the same folder, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorabench.runtime.job", description=__doc__.splitlines()[0])
    parser.add_argument("--config-json", required=True, help="payload JSON, or a path to a file holding it")
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    watch_parent()
    out = Path(args.out)
    result = run_payload(load_payload(args.config_json), env_path=out.with_name(out.name + ".env"))
    write_json(out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
