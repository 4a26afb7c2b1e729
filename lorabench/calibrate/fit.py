"""Fit the planner's device overheads on half of the GPU runs and report its accuracy on the other half.

The planner (:mod:`lorabench.memory.planner`) predicts three levels of a training step's peak:

    allocated A  (tensor bytes; the planner's model of activations, weights, states...)
    reserved  R = A + slack(A),  slack(A) = max(allocator_slack_fraction * A, allocator_slack_min_bytes)
    device    D = R + cuda_context_bytes          (what NVML / nvidia-smi sees)

The three overhead terms live in conf/calibration/<gpu>.yaml (default.yaml until a GPU has been fitted). This
module fits them from the campaign's records (results/<sweep>/records.jsonl; runs with status ok, device cuda and
no memory cap) and writes that file. Measured, per run i: a_i = ``torch_max_allocated_bytes``, r_i =
``torch_max_reserved_bytes``, d_i = ``nvml_peak_used_bytes``, which the runner already records relative to the
device's used memory before the job created its CUDA context (``lorabench.runtime.probe.NvmlReading``), so
d_i is the job's own device-level peak.

Fit (robust statistics, on the fit half only):

- context c_i = d_i - r_i: the CUDA context, kernel images and library handles/workspaces allocated outside the
  caching allocator (cuBLAS/cuBLASLt workspaces that torch takes through its allocator are inside r_i).
  ``cuda_context_bytes = median(c_i)``.
- slack s_i = r_i - a_i: the caching allocator's unused reserve, modelled as max(f * a, m). In large runs
  fragmentation grows with the allocated bytes: ``allocator_slack_fraction`` f = median(s_i / a_i) over the upper
  half of the fit runs by a_i. In small runs the fixed cost of partly used segments dominates:
  ``allocator_slack_min_bytes`` m = the m >= 0 that minimises sum_i |s_i - max(f * a_i, m)| over all fit runs (an
  L1, median-type fit; candidates 0 and every s_i; the smallest m on ties, so m = 0 when no run sits on a floor).

The slack is fitted against the MEASURED allocated bytes (allocator behaviour, not the planner's tensor model),
the accuracy is judged on the PREDICTED device bytes: the held-out error contains the planner's tensor-model
error too and is decomposed into (A_pred - a)/d + (slack_pred - s)/d + (context - c)/d. Workspaces that torch
takes through its allocator (cuBLAS/cuBLASLt) are tensors to ``max_memory_allocated`` but not to the planner; the
planner has no key for them, so they are not fitted: the fit half's allocated residual a - A_pred (quartiles) is
reported in ``fit.allocated_residual_bytes`` as the evidence for one (a constant offset there is a workspace).

Split: a run belongs to the fit half when sha1(SPLIT_SALT + run_id) is even, else it is held out; a run never
changes half when records are added. Capped runs (``memory_cap_bytes`` set: the OOM probes) are not fitted or
scored: the allocator behaves differently near a cap. Instead every probe with status ok or oom is a verdict
check: predicted fit (R <= cap, as :func:`lorabench.sweep.predicted_block` decides) must equal status ok.

Targets, on the held-out half: median |D_pred - d| / d <= 2 %, max <= 5 %; every probe's verdict right.
:func:`check` is the function the CI guard (tests/test_gpu_records.py) runs on the committed records.

    lorabench calibrate                                          # results/gpu-validate + results/gpu-probes
    lorabench calibrate --records a.jsonl b.jsonl --no-write

Exits 2 with one line when there are no GPU records (or too few to fit).
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[2]

SPLIT_SALT = "lorabench-calibration-split-v1:"
TARGET_MEDIAN_ABS_REL_ERR = 0.02
TARGET_MAX_ABS_REL_ERR = 0.05
MIN_FIT_RUNS = 4
DEFAULT_RECORDS = ("results/gpu-validate/records.jsonl", "results/gpu-probes/records.jsonl")
MEASURED_KEYS = ("torch_max_allocated_bytes", "torch_max_reserved_bytes", "nvml_peak_used_bytes")


class Refusal(Exception):
    """Nothing to calibrate from (printed as one line; exit status 2)."""


@dataclass(frozen=True)
class Calibration:
    """The planner's overhead terms (the keys of conf/calibration/*.yaml)."""

    cuda_context_bytes: int
    allocator_slack_fraction: float
    allocator_slack_min_bytes: int

    @classmethod
    def from_mapping(cls, doc: dict[str, Any]) -> "Calibration":
        return cls(int(doc["cuda_context_bytes"]), float(doc["allocator_slack_fraction"]),
                   int(doc["allocator_slack_min_bytes"]))

    def slack_bytes(self, allocated_bytes: int) -> int:
        """The planner's slack formula: max(fraction * allocated, min) (planner.predict)."""
        return int(max(self.allocator_slack_fraction * allocated_bytes, self.allocator_slack_min_bytes))


# ---------------------------------------------------------------------------------------------- records
def load_records(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Valid records of every existing file, one per run_id (the last appended wins)."""
    from lorabench import records

    found: list[dict[str, Any]] = []
    for path in paths:
        if Path(path).is_file():
            found += records.read_records(path)[0]
    return records.latest_per_run(found)[0]


def is_measured_gpu_run(record: dict[str, Any]) -> bool:
    """status ok, device cuda, no memory cap, and the three measured levels present."""
    cfg, measured = record["config"], record.get("measured") or {}
    return (record["status"] == "ok" and cfg.get("device") == "cuda" and cfg.get("memory_cap_bytes") is None
            and all(isinstance(measured.get(k), int) and measured[k] > 0 for k in MEASURED_KEYS))


def is_probe(record: dict[str, Any]) -> bool:
    """A capped CUDA run that ended ok or oom (a fit/OOM verdict check)."""
    cfg = record["config"]
    return cfg.get("device") == "cuda" and cfg.get("memory_cap_bytes") is not None and record["status"] in ("ok", "oom")


def measured_device_bytes(measured: dict[str, Any]) -> int:
    """The job's device-level peak: ``nvml_peak_used_bytes``, which :class:`lorabench.runtime.probe.NvmlSampler`
    already reports as (max used - used before the job's CUDA context); ``nvml_baseline_bytes`` is that
    baseline, absolute, for reference only."""
    return int(measured["nvml_peak_used_bytes"])


def half(run_id: str) -> str:
    """``"fit"`` or ``"heldout"``: the parity of sha1(SPLIT_SALT + run_id) (stable as records are added)."""
    return "fit" if int(hashlib.sha1((SPLIT_SALT + run_id).encode()).hexdigest(), 16) % 2 == 0 else "heldout"


def label(record: dict[str, Any]) -> str:
    cfg = record["config"]
    train = cfg["train"]
    cap = f" cap={cfg['memory_cap_bytes'] / 2**30:.2f}GiB" if cfg.get("memory_cap_bytes") else ""
    return (f"{cfg['model']} {cfg['method']['method']} mbs={train['micro_batch_size']} seq={train['seq_len']} "
            f"ckpt={'on' if train['gradient_checkpointing'] else 'off'}{cap}")


# ---------------------------------------------------------------------------------------------- prediction
def specs_of(config: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(ModelSpec, MethodConfig, TrainSpec, GpuSpec | None) of a record's config, built by the job's own code
    (:func:`lorabench.runtime.job.specs_from_config`) from the catalog model's hf_config plus the record's
    ``model_hf_config_overrides``, exactly as the sweep composed them."""
    from lorabench.catalog import load_gpu, load_model
    from lorabench.runtime.job import specs_from_config

    hf_config = dict(load_model(config["model"]).hf_config)
    hf_config.update(config.get("model_hf_config_overrides") or {})
    model, method, train = specs_from_config({"config": config, "hf_config": hf_config})
    return model, method, train, (load_gpu(config["gpu"]) if config.get("gpu") else None)


def predicted_levels(config: dict[str, Any], cal: Calibration | None) -> dict[str, int]:
    """The planner's allocated/reserved/device bytes for a config; ``cal`` replaces the committed overheads."""
    from lorabench.memory import planner

    model, method, train, gpu = specs_of(config)
    pred = planner.predict(model, method, train, gpu)
    if cal is None:
        return {"allocated": pred.peak_allocated_bytes, "reserved": pred.reserved_bytes, "device": pred.device_bytes}
    allocated = pred.peak_allocated_bytes
    reserved = allocated + cal.slack_bytes(allocated)
    return {"allocated": allocated, "reserved": reserved, "device": reserved + cal.cuda_context_bytes}


# ---------------------------------------------------------------------------------------------- fit
def fit(runs: list[dict[str, Any]]) -> Calibration:
    """Median context and two-regime slack (module docstring) from measured GPU runs."""
    if len(runs) < MIN_FIT_RUNS:
        raise Refusal(f"only {len(runs)} GPU runs in the fit half (need {MIN_FIT_RUNS}); run more of the campaign")
    m = [r["measured"] for r in runs]
    context = statistics.median(measured_device_bytes(x) - x["torch_max_reserved_bytes"] for x in m)
    pairs = sorted((x["torch_max_allocated_bytes"], x["torch_max_reserved_bytes"] - x["torch_max_allocated_bytes"])
                   for x in m)
    fraction = round(float(statistics.median(s / a for a, s in pairs[len(pairs) // 2:])), 6)
    return Calibration(int(round(context)), fraction, l1_floor(pairs, fraction))


def l1_floor(pairs: list[tuple[int, int]], fraction: float) -> int:
    """The floor m >= 0 minimising sum |s - max(fraction * a, m)| over (a, s) pairs (smallest m on ties).

    The cost is piecewise linear in m with kinks at the fraction * a and s values, and its minimum over m lies
    at one of the s values or at 0 (below every fraction * a the floor changes nothing)."""
    def cost(m: int) -> float:
        return sum(abs(s - max(fraction * a, m)) for a, s in pairs)

    return min(sorted({0, *(max(s, 0) for _, s in pairs)}), key=lambda m: (cost(m), m))


# ---------------------------------------------------------------------------------------------- accuracy
@dataclass(frozen=True)
class RunError:
    """Predicted vs measured device peak of one run, with the error split by level (parts sum to rel_err)."""

    run_id: str
    label: str
    measured_device_bytes: int
    predicted_device_bytes: int
    rel_err: float
    allocated_part: float
    slack_part: float
    context_part: float


@dataclass(frozen=True)
class VerdictCheck:
    run_id: str
    label: str
    cap_bytes: int
    predicted_reserved_bytes: int
    predicted_fits: bool
    measured_fits: bool

    @property
    def right(self) -> bool:
        return self.predicted_fits == self.measured_fits


def run_error(record: dict[str, Any], cal: Calibration | None) -> RunError:
    """(D_pred - d) / d, decomposed into allocated, slack and context parts."""
    x = record["measured"]
    a, r, d = x["torch_max_allocated_bytes"], x["torch_max_reserved_bytes"], measured_device_bytes(x)
    p = predicted_levels(record["config"], cal)
    return RunError(record["run_id"], label(record), d, p["device"], (p["device"] - d) / d,
                    (p["allocated"] - a) / d, ((p["reserved"] - p["allocated"]) - (r - a)) / d,
                    ((p["device"] - p["reserved"]) - (d - r)) / d)


def verdict(record: dict[str, Any], cal: Calibration | None) -> VerdictCheck:
    """Predicted fit under the cap (reserved <= cap) vs what happened (ok = fit, oom = not)."""
    cap = int(record["config"]["memory_cap_bytes"])
    reserved = predicted_levels(record["config"], cal)["reserved"]
    return VerdictCheck(record["run_id"], label(record), cap, reserved, reserved <= cap, record["status"] == "ok")


@dataclass
class Check:
    """Accuracy of the planner on one GPU's records (held-out half) and its verdicts on the probes."""

    gpu: str | None
    heldout: list[RunError] = field(default_factory=list)
    probes: list[VerdictCheck] = field(default_factory=list)

    @property
    def median_abs_rel_err(self) -> float:
        return statistics.median(abs(e.rel_err) for e in self.heldout) if self.heldout else float("nan")

    @property
    def max_abs_rel_err(self) -> float:
        return max(abs(e.rel_err) for e in self.heldout) if self.heldout else float("nan")

    def worst(self, n: int = 5) -> list[RunError]:
        return sorted(self.heldout, key=lambda e: -abs(e.rel_err))[:n]

    def failures(self, median_target: float = TARGET_MEDIAN_ABS_REL_ERR,
                 max_target: float = TARGET_MAX_ABS_REL_ERR) -> list[str]:
        """One line per missed target (empty when every target is met)."""
        out = []
        if not self.heldout:
            out.append(f"{self.gpu}: no held-out GPU runs to score")
        elif self.median_abs_rel_err > median_target:
            out.append(f"{self.gpu}: held-out median |err| {100 * self.median_abs_rel_err:.2f}% > "
                       f"{100 * median_target:.0f}% on device peak ({len(self.heldout)} runs)")
        if self.heldout and self.max_abs_rel_err > max_target:
            w = self.worst(1)[0]
            out.append(f"{self.gpu}: held-out max |err| {100 * self.max_abs_rel_err:.2f}% > {100 * max_target:.0f}% "
                       f"({w.label}, run {w.run_id})")
        out += [f"{self.gpu}: probe verdict wrong: {v.label} predicted {'fit' if v.predicted_fits else 'OOM'} "
                f"(reserved {v.predicted_reserved_bytes / 2**30:.2f} GiB), measured "
                f"{'ok' if v.measured_fits else 'oom'} (run {v.run_id})" for v in self.probes if not v.right]
        return out


def check(records: list[dict[str, Any]], cal: Calibration | None = None) -> dict[str, Check]:
    """Per GPU: the held-out half's device-peak errors and every probe's verdict.

    Args:
        records: run records (any devices; only CUDA ones are used).
        cal: overheads to evaluate; None uses the committed conf/calibration/<gpu>.yaml through
            ``planner.predict`` itself (what the CI guard does).
    """
    out: dict[str, Check] = {}
    for record in records:
        gpu = record["config"].get("gpu")
        if is_measured_gpu_run(record) and half(record["run_id"]) == "heldout":
            out.setdefault(gpu, Check(gpu)).heldout.append(run_error(record, cal))
        elif is_probe(record):
            out.setdefault(gpu, Check(gpu)).probes.append(verdict(record, cal))
    return out


def allocated_residuals(runs: list[dict[str, Any]]) -> dict[str, int]:
    """Quartiles of measured - predicted allocated bytes (a constant offset = an unmodelled workspace)."""
    res = sorted(r["measured"]["torch_max_allocated_bytes"] - predicted_levels(r["config"], None)["allocated"]
                 for r in runs)
    q1, q2, q3 = statistics.quantiles(res, n=4) if len(res) > 1 else (res[0],) * 3
    return {"p25": int(q1), "median": int(q2), "p75": int(q3)}
