"""Fit the step-time efficiencies from run records, fit on half, score on the other half (torch-free).

The model is linear in the inverse efficiencies: for run i,

    t_i = sum_c x_ic / eff_c + k_i * kernel_overhead_s + f_i * forward_op_overhead_s

with x_ic the roofline time of op class c at efficiency 1, k_i the ops of the step and f_i those of forwards
(:func:`lorabench.steptime.model.pieces`). The fit minimises the squared *relative* error
sum_i ((t_i - measured_i) / measured_i)^2 over eff_c > 0 and kernel_overhead_s >= 0 by non-negative least
squares (Lawson & Hanson 1974, "Solving Least Squares Problems", ch. 23); classes whose work scales alike
share one efficiency (:data:`GROUPS`), so a handful of records fix a handful of numbers.

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
    """(fit half, score half) by the parity of a hash of the configuration key."""
    def odd(r: Run) -> bool:
        return int(hashlib.sha1(r.key.encode()).hexdigest(), 16) % 2 == 1

    return [r for r in runs if not odd(r)], [r for r in runs if odd(r)]


def features(run: Run, device: GpuSpec) -> list[float]:
    """[x_c for c in EFFICIENCY_CLASSES] + [all ops, forward ops]."""
    xs = {c: 0.0 for c in EFFICIENCY_CLASSES}
    kernels = forward = 0.0
    for p in pieces(run.model, run.method, run.train, device):
        xs[p.cls] += p.unit_time_s()
        kernels += p.work.kernels
        forward += p.work.kernels if p.forward else 0.0
    return [xs[c] for c in EFFICIENCY_CLASSES] + [kernels, forward]


#: Classes that share one fitted efficiency: few records cannot tell apart classes whose work scales alike,
#: and a fit per class would chase noise. Communication keeps its default (single-device records).
#: Four groups: FLOP-bound work (dense matmuls, attention, adapter matmuls), the NF4 dequantization, the
#: activations' memory-bound ops (norms, activations, loss), and the optimizer's streaming of its states.
GROUPS: tuple[tuple[str, ...], ...] = (
    ("matmul_forward", "matmul_input_grad", "matmul_weight_grad", "attention", "adapter"),
    ("dequant",),
    ("elementwise", "loss"),
    ("optimizer",),
)


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Least squares by the normal equations and Gaussian elimination with partial pivoting (few columns)."""
    n = len(a[0])
    m = [[sum(r[i] * r[j] for r in a) + (1e-12 if i == j else 0.0) for j in range(n)] + [sum(r[i] * bi for r, bi in zip(a, b))]
         for i in range(n)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col and m[col][col]:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] if m[i][i] else 0.0 for i in range(n)]


def _nnls(a: list[list[float]], b: list[float]) -> list[float]:
    """min |A x - b| over x >= 0: least squares on the free columns, dropping those that go negative
    (the active-set idea of Lawson & Hanson; exact for the few, well-separated columns here)."""
    free = list(range(len(a[0])))
    while free:
        sol = _solve([[row[j] for j in free] for row in a], b)
        if all(v >= 0 for v in sol):
            break
        free = [j for j, v in zip(free, sol) if v >= 0]
    x = [0.0] * len(a[0])
    for j, v in zip(free, sol if free else []):
        x[j] = v
    return x


def fit(runs: list[Run], device: GpuSpec, defaults: TimeCalibration) -> TimeCalibration:
    """Group efficiencies (:data:`GROUPS`) and per-op overheads minimising the relative error over ``runs``.

    A group whose coefficient comes out 0 (its work explains nothing the others do not) keeps the defaults.
    """
    index = {c: i for i, c in enumerate(EFFICIENCY_CLASSES)}
    rows = []
    for run in runs:
        f = features(run, device)
        cols = [sum(f[index[c]] for c in group) for group in GROUPS] + f[-2:]
        rows.append([v / run.measured_s for v in cols])
    scale = [max((abs(r[j]) for r in rows), default=0.0) or 1.0 for j in range(len(rows[0]))]
    coef = [v / sc for v, sc in zip(_nnls([[r[j] / scale[j] for j in range(len(r))] for r in rows], [1.0] * len(rows)),
                                    scale)]
    eff = dict(defaults.efficiency)
    for k, group in enumerate(GROUPS):
        for c in group:
            eff[c] = 1.0 / coef[k] if coef[k] > 0 else defaults.efficiency[c]
    return TimeCalibration(eff, coef[-2], f"fitted on {len(runs)} configurations", coef[-1])


def errors(runs: list[Run], device: GpuSpec, cal: TimeCalibration) -> list[tuple[Run, float, float]]:
    """(run, predicted s, relative error) for each run."""
    out = []
    for run in runs:
        pred = predict_time(run.model, run.method, run.train, device, cal).step_time_s
        out.append((run, pred, (pred - run.measured_s) / run.measured_s))
    return out
