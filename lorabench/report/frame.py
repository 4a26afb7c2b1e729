"""Derived columns the report tables and figures share (pandas, torch-free).

:func:`prepare` turns the flat record frame of :func:`lorabench.records.to_frame` into one row per run
with short names: the run's labels (model, method, b, s, ckpt, precision) and, for each reconciliation
level, the predicted bytes, the measured bytes and the signed relative error

    err = (predicted - measured) / measured

(positive: the planner over-estimates). Levels (docs/ARCHITECTURE.md, "three ways to know a number"):

* ``allocated``: tensor bytes. predicted.peak_allocated_bytes vs torch.cuda.max_memory_allocated on a
  GPU, or the live-storage tracker's peak (measured.tracker.peak_bytes) on the CPU.
* ``reserved``: + caching-allocator slack. predicted.reserved_bytes vs torch.cuda.max_memory_reserved.
* ``device``: + CUDA context and workspaces. predicted.device_bytes vs NVML used peak minus the NVML
  baseline taken before the run.
* ``traced`` (when present): the fake-tensor trace's peak vs the measured allocated peak,
  err = (traced - measured) / measured.

Errors are computed for runs with status "ok" only (an OOM run's peak is cut short).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from lorabench.memory.categories import PLANNER_COMPONENTS, TRACE_CATEGORIES, to_trace_categories
from lorabench.methods import CONFIGS

LEVELS: tuple[str, ...] = ("allocated", "reserved", "device")
LEVEL_TITLES: dict[str, str] = {
    "allocated": "allocated (tensors)", "reserved": "reserved (allocator)", "device": "device (NVML)",
    "traced": "traced (fake tensors)",
}
#: Canonical method order (tables, legends, colors): the registry's order, each method's labels.
METHOD_ORDER: tuple[str, ...] = tuple(label for cls in CONFIGS.values() for label in cls.all_labels())
#: predicted.fits as words (null: no GPU and no memory cap to judge against).
VERDICTS: tuple[str, ...] = ("fits", "does not fit", "no verdict")
GIB = 2**30
MIB = 2**20


def col(df: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name`` or an all-NaN column when no record has that field."""
    if name in df.columns:
        return df[name]
    return pd.Series([math.nan] * len(df), index=df.index, dtype=float)


def num(df: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name`` as floats (None/missing -> NaN)."""
    return pd.to_numeric(col(df, name), errors="coerce").astype(float)


def method_label(method: str, backend: Any) -> str:
    """The method's report label for a run (``qlora[bnb]`` for the bitsandbytes QLoRA backend), the bare name
    for a method this checkout does not know."""
    cls = CONFIGS.get(str(method))
    return cls.label_for({"backend": backend}) if cls is not None else str(method)


def method_rank(label: str) -> int:
    return METHOD_ORDER.index(label) if label in METHOD_ORDER else len(METHOD_ORDER)


def _non_default_knobs(method_dict: Any) -> str:
    """Knobs that differ from the method's defaults, e.g. ``r=64 target_modules=all-linear``."""
    if not isinstance(method_dict, dict) or "method" not in method_dict:
        return ""
    from lorabench.methods import make_config

    try:
        defaults = make_config(method_dict["method"]).to_dict()
    except Exception:  # a method this checkout does not know: show nothing rather than fail the report
        return ""
    diffs = []
    for key in sorted(method_dict):
        if key in ("method", "backend") or method_dict[key] == defaults.get(key):
            continue
        value = method_dict[key]
        value = ",".join(map(str, value)) if isinstance(value, list) else value
        diffs.append(f"{key}={value}")
    return " ".join(diffs)


def _method_dicts(df: pd.DataFrame) -> list[dict[str, Any]]:
    """config.method of each row rebuilt from the flat columns."""
    prefix = "config.method."
    names = [c for c in df.columns if c.startswith(prefix)]
    out = []
    for _, row in df[names].iterrows():
        out.append({c[len(prefix):]: _plain(row[c]) for c in names if not _missing(row[c])})
    return out


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars (for comparisons and JSON)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def _train_key(df: pd.DataFrame) -> list[str]:
    """Canonical JSON of each row's config.train (groups runs that share a training configuration)."""
    prefix = "config.train."
    names = sorted(c for c in df.columns if c.startswith(prefix))
    keys = []
    for _, row in df[names].iterrows():
        keys.append(json.dumps({c[len(prefix):]: _plain(row[c]) for c in names if not _missing(row[c])},
                               sort_keys=True))
    return keys


def _rel_err(pred: pd.Series, meas: pd.Series, ok: pd.Series) -> pd.Series:
    err = (pred - meas) / meas
    return err.where(ok & (meas > 0) & pred.notna())


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run with the report's derived columns, sorted (model size, model, method, b, s...)."""
    out = pd.DataFrame(index=df.index)
    out["run_id"] = col(df, "run_id").astype(str)
    out["status"] = col(df, "status").astype(str)
    out["model"] = col(df, "config.model").astype(str)
    out["method_name"] = col(df, "config.method.method").astype(str)
    out["method"] = [method_label(m, b) for m, b in zip(out["method_name"], col(df, "config.method.backend"))]
    out["knobs"] = [_non_default_knobs(d) for d in _method_dicts(df)]
    out["b"] = num(df, "config.train.micro_batch_size")
    out["s"] = num(df, "config.train.seq_len")
    ckpt = col(df, "config.train.gradient_checkpointing")
    out["ckpt"] = ["off" if _missing(v) or not bool(v) else "on" for v in ckpt]
    out["precision"] = col(df, "config.train.precision").astype(str)
    out["optimizer"] = col(df, "config.train.optimizer").astype(str)
    out["train_key"] = _train_key(df)
    out["cuda"] = col(df, "config.device").astype(str).eq("cuda")
    out["gpu"] = [("" if _missing(v) else str(v)) for v in col(df, "config.gpu")]
    out["device_name"] = [("unknown" if _missing(v) else str(v)) for v in col(df, "env.device_name")]
    out["verdict"] = [VERDICTS[2] if _missing(v) else VERDICTS[0 if v else 1] for v in col(df, "predicted.fits")]
    out["total_params"] = num(df, "predicted.total_params")
    out["tokens_per_s"] = num(df, "measured.tokens_per_s")
    ok = out["status"].eq("ok")

    out["allocated_pred"] = num(df, "predicted.peak_allocated_bytes")
    out["allocated_meas"] = num(df, "measured.torch_max_allocated_bytes").where(
        out["cuda"], num(df, "measured.tracker.peak_bytes"))
    out["reserved_pred"] = num(df, "predicted.reserved_bytes")
    out["reserved_meas"] = num(df, "measured.torch_max_reserved_bytes")
    out["device_pred"] = num(df, "predicted.device_bytes")
    # The NVML sampler records the peak already minus the pre-run baseline (runtime/probe.py).
    out["device_meas"] = num(df, "measured.nvml_peak_used_bytes")
    for level in LEVELS:
        out[f"{level}_err"] = _rel_err(out[f"{level}_pred"], out[f"{level}_meas"], ok)
    out["traced_pred"] = num(df, "traced.peak_bytes")
    out["traced_meas"] = out["allocated_meas"]
    out["traced_err"] = _rel_err(out["traced_pred"], out["traced_meas"], ok)
    out["peak_meas"] = out["device_meas"].fillna(out["allocated_meas"])
    _add_components(df, out)
    return sort_runs(out).reset_index(drop=True)


def _add_components(df: pd.DataFrame, out: pd.DataFrame) -> None:
    """``pred.<category>`` (planner components summed into tracker categories), ``tracker.<category>`` and
    ``traced.<category>`` columns, plus ``comp.<component>`` with the raw planner components."""
    comps = [f"comp.{name}" for name in PLANNER_COMPONENTS]
    for name, column in zip(PLANNER_COMPONENTS, comps):
        out[column] = num(df, f"predicted.components.{name}")
    per_category = [
        to_trace_categories({n: int(v) for n, v in zip(PLANNER_COMPONENTS, row) if not math.isnan(v)})
        if not all(math.isnan(v) for v in row) else {}
        for row in out[comps].itertuples(index=False, name=None)
    ]
    for cat in TRACE_CATEGORIES:
        out[f"pred.{cat}"] = [float(c[cat]) if c else math.nan for c in per_category]
        out[f"tracker.{cat}"] = num(df, f"measured.tracker.components.{cat}")
        out[f"traced.{cat}"] = num(df, f"traced.components.{cat}")


def sort_runs(out: pd.DataFrame) -> pd.DataFrame:
    """Deterministic row order: smaller models first, then method order, knobs, b, s, ckpt, precision, id."""
    size = out.groupby("model")["total_params"].transform("max").fillna(0)
    keys = pd.DataFrame({
        "size": size, "model": out["model"], "m": out["method"].map(method_rank), "method": out["method"],
        "knobs": out["knobs"], "b": out["b"].fillna(0), "s": out["s"].fillna(0), "ckpt": out["ckpt"],
        "precision": out["precision"], "optimizer": out["optimizer"], "device": out["device_name"],
        "run_id": out["run_id"],
    })
    order = keys.sort_values(list(keys.columns), kind="mergesort").index
    return out.loc[order]


def unit_for(values: list[float] | pd.Series) -> tuple[str, int]:
    """("GiB", 2**30) when the largest value is at least 1 GiB, else ("MiB", 2**20)."""
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return ("GiB", GIB) if finite and max(abs(v) for v in finite) >= GIB else ("MiB", MIB)


def fmt_bytes(value: Any, scale: int) -> str:
    """Bytes in the table's unit: 3 decimals for GiB, 2 for MiB; "—" when missing."""
    if _missing(value):
        return "—"
    return f"{float(value) / scale:.{3 if scale == GIB else 2}f}"


def fmt_err(value: Any) -> str:
    """Signed percentage with one decimal, e.g. ``+4.2%`` (``0.0%`` when it rounds to zero); "—" when missing."""
    if _missing(value):
        return "—"
    pct = round(float(value) * 100, 1)
    return "0.0%" if pct == 0 else f"{pct:+.1f}%"


def fmt_pct(value: Any) -> str:
    """Unsigned percentage with one decimal; "—" when missing."""
    return "—" if _missing(value) else f"{float(value) * 100:.1f}%"


def fmt_num(value: Any, digits: int = 0) -> str:
    """A number with thousands separators; "—" when missing."""
    return "—" if _missing(value) else f"{float(value):,.{digits}f}"
