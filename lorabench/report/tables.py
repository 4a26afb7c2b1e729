"""Markdown tables of a sweep (tabulate, "github" format), built from :func:`lorabench.report.frame.prepare`.

Every function takes the prepared runs frame (already sorted) and returns markdown, or ``""`` when the
sweep has nothing to show for that table. Numbers use fixed formats (frame.fmt_*) so the same records
always give the same bytes.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from tabulate import tabulate

from lorabench.memory.categories import TRACE_CATEGORIES
from lorabench.report.frame import (
    LEVEL_TITLES, LEVELS, VERDICTS, fmt_bytes, fmt_err, fmt_num, fmt_pct, method_rank, unit_for,
)

RUN_COLUMNS: tuple[str, ...] = ("model", "method", "knobs", "b", "s", "ckpt", "precision")


def md(rows: list[list[Any]], headers: list[str]) -> str:
    """A GitHub markdown table; every cell is already a string (no float re-formatting by tabulate)."""
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _run_cells(row: pd.Series, with_knobs: bool) -> list[str]:
    cells = [row["model"], row["method"]]
    if with_knobs:
        cells.append(row["knobs"] or "defaults")
    return cells + [fmt_num(row["b"]), fmt_num(row["s"]), row["ckpt"], row["precision"]]


def _run_headers(with_knobs: bool) -> list[str]:
    return [c for c in RUN_COLUMNS if with_knobs or c != "knobs"]


def levels_present(runs: pd.DataFrame) -> list[str]:
    """Levels (and "traced") for which at least one run has a measurement or a trace."""
    present = [lvl for lvl in LEVELS if runs[f"{lvl}_meas"].notna().any()]
    if runs["traced_pred"].notna().any():
        present.append("traced")
    return present


def byte_unit(runs: pd.DataFrame, levels: list[str]) -> tuple[str, int]:
    """One unit for a whole table, picked from the largest number it shows."""
    values = pd.concat([runs[f"{lvl}_{k}"] for lvl in levels for k in ("pred", "meas")])
    return unit_for(values)


def reconciliation_table(runs: pd.DataFrame) -> str:
    """Per run: predicted vs measured bytes and signed error at each level with data (and traced)."""
    levels = levels_present(runs)
    if not levels or runs.empty:
        return ""
    unit, scale = byte_unit(runs, levels)
    with_knobs = runs["knobs"].ne("").any()
    headers = _run_headers(with_knobs) + ["status"]
    for lvl in levels:
        if lvl == "traced":
            headers += [f"traced ({unit})", "traced err"]
        else:
            headers += [f"{lvl} pred ({unit})", f"{lvl} meas ({unit})", f"{lvl} err"]
    rows = []
    for _, row in runs.iterrows():
        cells = _run_cells(row, with_knobs) + [row["status"]]
        for lvl in levels:
            cells.append(fmt_bytes(row[f"{lvl}_pred"], scale))
            if lvl != "traced":
                cells.append(fmt_bytes(row[f"{lvl}_meas"], scale))
            cells.append(fmt_err(row[f"{lvl}_err"]))
        rows.append(cells)
    return md(rows, headers)


def _abs_stats(errors: pd.Series) -> tuple[str, str, str]:
    e = errors.dropna()
    if e.empty:
        return "0", "—", "—"
    return str(len(e)), fmt_pct(e.abs().median()), fmt_pct(e.abs().max())


def summary_table(runs: pd.DataFrame) -> str:
    """Per method and overall: number of compared runs, median and max of |err| at each level.

    (Column titles say "abs err": a literal '|' would split a markdown table cell.)"""
    levels = levels_present(runs)
    if not levels or runs.empty:
        return ""
    headers = ["method"]
    for lvl in levels:
        headers += [f"{lvl} n", f"{lvl} median abs err", f"{lvl} max abs err"]
    rows = []
    methods = sorted(runs["method"].unique(), key=lambda m: (method_rank(m), m))
    for method in [*methods, None]:
        part = runs if method is None else runs[runs["method"] == method]
        cells = ["**all**" if method is None else method]
        for lvl in levels:
            cells += _abs_stats(part[f"{lvl}_err"])
        rows.append(cells)
    return md(rows, headers)


#: A component whose error is large in percent (>= 5 %) but smaller in bytes than this fraction of the run's
#: measured peak is shown as "≈" (a few stray bytes, e.g. a 64-byte rotary buffer, would read as -100 %).
NEGLIGIBLE_FRACTION = 0.001


def _component_cell(pred: float, meas: float, peak: float, scale: int) -> str:
    """``measured (signed error)``; "0" when both sides are empty, "≈" for a negligible difference in bytes."""
    if math.isnan(meas):
        return "—"
    pred = 0.0 if math.isnan(pred) else pred
    if meas == 0 and pred == 0:
        return "0"
    small_difference = abs(pred - meas) < NEGLIGIBLE_FRACTION * peak
    if meas == 0:
        return "0 (≈)" if small_difference else f"0 (pred {fmt_bytes(pred, scale)})"
    err = (pred - meas) / meas
    if small_difference and abs(err) >= 0.05:
        return f"{fmt_bytes(meas, scale)} (≈)"
    return f"{fmt_bytes(meas, scale)} ({fmt_err(err)})"


def component_table(runs: pd.DataFrame) -> str:
    """Per run: bytes per tracker category at the peak and the planner's signed error for each.

    The source is the live-storage tracker of the measurement when it recorded components, else the
    fake-tensor trace (GPU runs usually have only the trace). Planner components are summed into tracker
    categories with ``to_trace_categories``.
    """
    ok = runs[runs["status"].eq("ok") & runs[[f"pred.{c}" for c in TRACE_CATEGORIES]].notna().any(axis=1)]
    rows_src = []
    for _, row in ok.iterrows():
        for source in ("tracker", "traced"):
            if any(not math.isnan(row[f"{source}.{c}"]) for c in TRACE_CATEGORIES):
                rows_src.append((row, source))
                break
    if not rows_src:
        return ""
    unit, scale = unit_for([row[f"{src}.{c}"] for row, src in rows_src for c in TRACE_CATEGORIES])
    with_knobs = runs["knobs"].ne("").any()
    headers = _run_headers(with_knobs) + ["source"] + [f"{c} ({unit})" for c in TRACE_CATEGORIES]
    body = []
    for row, source in rows_src:
        peak = sum(0.0 if math.isnan(row[f"{source}.{c}"]) else row[f"{source}.{c}"] for c in TRACE_CATEGORIES)
        cells = _run_cells(row, with_knobs) + [source]
        cells += [_component_cell(row[f"pred.{c}"], row[f"{source}.{c}"], peak, scale) for c in TRACE_CATEGORIES]
        body.append(cells)
    return md(body, headers)


def _observed(status: str) -> str:
    return status if status in ("ok", "oom") else "other"


def confusion_table(runs: pd.DataFrame) -> tuple[str, list[str]]:
    """Planner verdict (predicted.fits) vs observed status: the table (verdict rows with no run left out)
    and one line per disagreement (missed OOMs first)."""
    observed = runs["status"].map(_observed)
    columns = ["ok", "oom", "other"]
    rows = []
    for v in VERDICTS:
        counts = [int(((runs["verdict"] == v) & (observed == o)).sum()) for o in columns]
        if sum(counts):
            rows.append([f"planner: {v}", *map(str, counts), str(sum(counts))])
    table = md(rows, ["", "observed ok", "observed oom", "observed failed/timeout/nan", "total"])
    notes = []
    for label, mask in (
        ("missed OOM (planner said it fits, the run ran out of memory)",
         (runs["verdict"] == VERDICTS[0]) & (observed == "oom")),
        ("over-cautious (planner said it does not fit, the run succeeded)",
         (runs["verdict"] == VERDICTS[1]) & (observed == "ok")),
    ):
        for _, row in runs[mask].iterrows():
            notes.append(f"{label}: {row['model']} {row['method']} b={fmt_num(row['b'])} s={fmt_num(row['s'])} "
                         f"ckpt={row['ckpt']} {row['precision']}")
    return table, notes


def _pairs(runs: pd.DataFrame, left: str, right: str) -> list[tuple[pd.Series, pd.Series]]:
    """(left run, right run) with the same model, training config and device; knobs matched when possible
    (a right run whose knobs equal the left's is preferred, else the first in table order)."""
    pairs = []
    ok = runs[runs["status"].eq("ok")]
    for _, lrow in ok[ok["method"] == left].iterrows():
        same = ok[(ok["method"] == right) & (ok["model"] == lrow["model"]) & (ok["train_key"] == lrow["train_key"])
                  & (ok["device_name"] == lrow["device_name"])]
        if same.empty:
            continue
        exact = same[same["knobs"] == lrow["knobs"]]
        pairs.append((lrow, (exact if not exact.empty else same).iloc[0]))
    return pairs


def _ratio(a: Any, b: Any) -> str:
    if any(v is None or math.isnan(float(v)) for v in (a, b)) or float(b) == 0:
        return "—"
    return f"{float(a) / float(b):.2f}x"


def ratio_table(runs: pd.DataFrame, left: str, right: str) -> str:
    """Ratios left/right of tokens/s and measured peak memory (allocated, and device level when measured)
    for paired runs."""
    pairs = _pairs(runs, left, right)
    if not pairs:
        return ""
    with_device = any(not math.isnan(float(row["device_meas"])) for pair in pairs for row in pair)
    headers = ["model", "b", "s", "ckpt", "precision", f"{left} knobs", f"{right} knobs",
               "tokens/s ratio", "allocated peak ratio"] + (["device peak ratio"] if with_device else [])
    rows = []
    for lrow, rrow in pairs:
        cells = [lrow["model"], fmt_num(lrow["b"]), fmt_num(lrow["s"]), lrow["ckpt"], lrow["precision"],
                 lrow["knobs"] or "defaults", rrow["knobs"] or "defaults",
                 _ratio(lrow["tokens_per_s"], rrow["tokens_per_s"]),
                 _ratio(lrow["allocated_meas"], rrow["allocated_meas"])]
        if with_device:
            cells.append(_ratio(lrow["device_meas"], rrow["device_meas"]))
        rows.append(cells)
    return md(rows, headers)


def level_legend(levels: list[str]) -> str:
    """One line per level saying what is compared with what."""
    text = {
        "allocated": "predicted.peak_allocated_bytes vs torch max_memory_allocated (GPU) or the tracker peak (CPU)",
        "reserved": "predicted.reserved_bytes vs torch max_memory_reserved",
        "device": "predicted.device_bytes vs NVML peak used minus the NVML baseline before the run",
        "traced": "the fake-tensor trace's peak vs the measured allocated peak",
    }
    lines = [f"- **{LEVEL_TITLES[lvl]}**: {text[lvl]}." for lvl in levels]
    lines.append("- err = (predicted - measured) / measured: positive means the planner over-estimates; "
                 "computed for runs with status ok only.")
    return "\n".join(lines)
