"""Fit the step-time efficiencies from run records, fit on half, score on the other half (torch-free).

The model is linear in the inverse efficiencies: for run i,

    t_i = sum_c x_ic / eff_c + k_i * kernel_overhead_s + f_i * forward_op_overhead_s

with x_ic the roofline time of op class c at efficiency 1, k_i the ops of the step and f_i those of forwards
(:func:`lorabench.steptime.model.pieces`). The fit minimises the squared *relative* error
sum_i ((t_i - measured_i) / measured_i)^2 over eff_c > 0 and kernel_overhead_s >= 0 by non-negative least
squares (Lawson & Hanson 1974, "Solving Least Squares Problems", ch. 23), with a small ridge pulling each
inverse efficiency towards its documented default so that a class few records exercise stays near it.

Records are split by configuration (every repeat of one config lands in the same half, by a hash of the
config without its seed), so the scored half holds configurations the fit never saw.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass
from typing import Any, Iterable

from lorabench.architectures import spec_from_hf_config
from lorabench.catalog import load_model
from lorabench.methods import make_config
from lorabench.methods.base import MethodConfig
from lorabench.specs import GpuSpec, ModelSpec, TrainSpec
from lorabench.steptime.calibration import EFFICIENCY_CLASSES, TimeCalibration
from lorabench.steptime.model import pieces, predict_time


@dataclass(frozen=True)
class Run:
    """One measured configuration: its specs, the median step time over repeats, a stable key."""

    key: str
    model: ModelSpec
    method: MethodConfig
    train: TrainSpec
    measured_s: float
    repeats: int


def _config_key(config: dict[str, Any]) -> str:
    c = {k: v for k, v in config.items() if k != "seed"}
    return hashlib.sha1(json.dumps(c, sort_keys=True).encode()).hexdigest()[:16]


def record_specs(record: dict[str, Any]) -> tuple[ModelSpec, MethodConfig, TrainSpec]:
    """The model (with its hf_config overrides), method config and TrainSpec a record ran."""
    cfg = record["config"]
    base = load_model(cfg["model"])
    overrides = cfg.get("model_hf_config_overrides") or {}
    model = spec_from_hf_config({**base.hf_config, **overrides}, name=base.name, display=base.display) if overrides else base
    knobs = {k: v for k, v in cfg["method"].items() if k != "method"}
    return model, make_config(cfg["method"]["method"], knobs), TrainSpec.from_record(cfg["train"])


def runs_from_records(records: Iterable[dict[str, Any]]) -> list[Run]:
    """ok records grouped by configuration (repeats differ only by seed); median of their median step times."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status") == "ok" and (r.get("measured") or {}).get("step_time_s_median"):
            groups.setdefault(_config_key(r["config"]), []).append(r)
    out = []
    for key, rs in sorted(groups.items()):
        model, method, train = record_specs(rs[0])
        out.append(Run(key, model, method, train, statistics.median(r["measured"]["step_time_s_median"] for r in rs), len(rs)))
    return out


def split(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """(fit half, score half) by the parity of the config hash."""
    return [r for r in runs if int(r.key, 16) % 2 == 0], [r for r in runs if int(r.key, 16) % 2 == 1]


def features(run: Run, device: GpuSpec) -> list[float]:
    """[x_c for c in EFFICIENCY_CLASSES] + [all ops, forward ops]."""
    xs = {c: 0.0 for c in EFFICIENCY_CLASSES}
    kernels = forward = 0.0
    for p in pieces(run.model, run.method, run.train, device):
        xs[p.cls] += p.unit_time_s()
        kernels += p.work.kernels
        forward += p.work.kernels if p.forward else 0.0
    return [xs[c] for c in EFFICIENCY_CLASSES] + [kernels, forward]


def _nnls(a: list[list[float]], b: list[float], prior: list[float], ridge: float, sweeps: int = 4000) -> list[float]:
    """min |A x - b|^2 + ridge * |x - prior|^2 over x >= 0 by cyclic coordinate descent (convex, so it converges)."""
    n = len(prior)
    x = list(prior)
    cols = [[row[j] for row in a] for j in range(n)]
    norms = [sum(v * v for v in col) + ridge for col in cols]
    resid = [sum(row[j] * x[j] for j in range(n)) - bi for row, bi in zip(a, b)]
    for _ in range(sweeps):
        delta = 0.0
        for j in range(n):
            if norms[j] == ridge and ridge == 0:
                continue
            grad = sum(c * r for c, r in zip(cols[j], resid)) + ridge * (x[j] - prior[j])
            new = max(0.0, x[j] - grad / norms[j])
            step = new - x[j]
            if step:
                resid = [r + step * c for r, c in zip(resid, cols[j])]
                x[j] = new
                delta = max(delta, abs(step) / (abs(x[j]) + 1e-30))
        if delta < 1e-10:
            break
    return x


def fit(runs: list[Run], device: GpuSpec, defaults: TimeCalibration, ridge: float = 1e-3) -> TimeCalibration:
    """Efficiencies and kernel overhead minimising the relative error over ``runs``."""
    rows = []
    for run in runs:
        f = features(run, device)
        rows.append([v / run.measured_s for v in f])
    scale = [max((abs(r[j]) for r in rows), default=0.0) or 1.0 for j in range(len(rows[0]))]
    a = [[r[j] / scale[j] for j in range(len(r))] for r in rows]
    overhead0 = device.kernel_overhead_s or defaults.kernel_overhead_s
    prior = [1.0 / defaults.efficiency[c] for c in EFFICIENCY_CLASSES] + [overhead0, defaults.forward_op_overhead_s]
    sol = _nnls(a, [1.0] * len(rows), [p * s for p, s in zip(prior, scale)], ridge)
    coef = [v / s for v, s in zip(sol, scale)]
    eff = {c: (1.0 / coef[i] if coef[i] > 0 else defaults.efficiency[c]) for i, c in enumerate(EFFICIENCY_CLASSES)}
    return TimeCalibration(eff, coef[-2], f"fitted on {len(runs)} configurations", coef[-1])


def errors(runs: list[Run], device: GpuSpec, cal: TimeCalibration) -> list[tuple[Run, float, float]]:
    """(run, predicted s, relative error) for each run."""
    out = []
    for run in runs:
        pred = predict_time(run.model, run.method, run.train, device, cal).step_time_s
        out.append((run, pred, (pred - run.measured_s) / run.measured_s))
    return out
