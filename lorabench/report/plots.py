"""Report figures (matplotlib, Agg backend), deterministic: fixed size/dpi/fonts, no metadata stamps.

Each function draws from the prepared runs frame (:func:`lorabench.report.frame.prepare`), writes one
PNG and returns True, or returns False (and writes nothing) when the sweep has no data for it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from lorabench.memory.categories import PLANNER_COMPONENTS
from lorabench.report.frame import LEVEL_TITLES, METHOD_ORDER, fmt_num, method_rank, unit_for

DPI = 110
_RC = {
    "svg.hashsalt": "lorabench",
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "path.simplify": False,
}
_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")
#: Non-tensor components, hatched in the breakdown (they only count at the reserved/device levels).
_OVERHEAD = {"allocator_slack": "reserved level", "cuda_context": "device level"}


def method_color(label: str) -> str:
    """A fixed color per method label (same in every figure and report)."""
    rank = method_rank(label)
    return _TAB10[rank % len(_TAB10)] if rank < len(METHOD_ORDER) else _TAB10[7]


def method_marker(label: str) -> str:
    """A fixed marker per method label (tells methods apart without color)."""
    return _MARKERS[method_rank(label) % len(_MARKERS)]


def component_color(name: str) -> str:
    return _TAB10[PLANNER_COMPONENTS.index(name) % len(_TAB10)]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    _pyplot().close(fig)


def _methods(runs: pd.DataFrame) -> list[str]:
    return sorted(runs["method"].unique(), key=lambda m: (method_rank(m), m))


def _wide(values: pd.Series) -> bool:
    """Log axes when the data spans more than a factor of 20."""
    v = values[values > 0]
    return not v.empty and v.max() / v.min() > 20


def _log_axis(axis: Any) -> None:
    """Log scale with ticks at 1, 2, 5 x 10^k labelled as plain numbers (no 2x10^0 clutter)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if axis is axis.axes.xaxis:
        axis.axes.set_xscale("log")
    else:
        axis.axes.set_yscale("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _thousands(axis: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}"))


def _scatter_levels(runs: pd.DataFrame) -> Iterator[str]:
    for lvl in ("allocated", "reserved", "device", "traced"):
        if (runs[f"{lvl}_err"].notna()).any():
            yield lvl


def scatter_predicted_vs_measured(runs: pd.DataFrame, path: Path) -> bool:
    """Predicted (y) vs measured (x) peak per level, y = x and a +-10 % band, colored by method."""
    levels = list(_scatter_levels(runs))
    if not levels:
        return False
    plt = _pyplot()
    with plt.rc_context(_RC):
        ncols = 2 if len(levels) == 4 else len(levels)
        nrows = math.ceil(len(levels) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols + 1.6, 4.2 * nrows), squeeze=False)
        for ax, lvl in zip(axes.flat, levels):
            part = runs[runs[f"{lvl}_err"].notna()]
            unit, scale = unit_for(pd.concat([part[f"{lvl}_pred"], part[f"{lvl}_meas"]]))
            x, y = part[f"{lvl}_meas"] / scale, part[f"{lvl}_pred"] / scale
            both = pd.concat([x, y])
            positive = both[both > 0]
            lo = (positive.min() if not positive.empty else 1.0) * 0.8
            hi = max(both.max() * 1.2, lo * 2)
            line = [lo, hi]
            ax.plot(line, line, color="black", linewidth=1, label="y = x (exact)")
            ax.plot(line, [v * 1.1 for v in line], color="grey", linewidth=0.8, linestyle="--", label="±10 %")
            ax.plot(line, [v * 0.9 for v in line], color="grey", linewidth=0.8, linestyle="--")
            for method in _methods(part):
                sel = part["method"] == method
                ax.scatter(x[sel], y[sel], s=22, color=method_color(method), marker=method_marker(method),
                           label=method, alpha=0.85, edgecolors="none")
            if _wide(both):
                _log_axis(ax.xaxis)
                _log_axis(ax.yaxis)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ylabel = "traced peak" if lvl == "traced" else "predicted"
            ax.set_xlabel(f"measured {'allocated' if lvl == 'traced' else lvl} peak ({unit})")
            ax.set_ylabel(f"{ylabel} ({unit})")
            ax.set_title(f"{LEVEL_TITLES[lvl]}, n={len(part)}")
            ax.grid(True, linewidth=0.4, alpha=0.5)
        for ax in list(axes.flat)[len(levels):]:
            ax.set_visible(False)
        seen: dict[str, Any] = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(label, handle)
        lines = ["y = x (exact)", "±10 %"]
        order = lines + [m for m in METHOD_ORDER if m in seen] + sorted(
            name for name in seen if name not in METHOD_ORDER and name not in lines)
        fig.legend([seen[name] for name in order], order, loc="center right", frameon=False)
        fig.tight_layout(rect=(0, 0, 1 - 1.4 / fig.get_figwidth(), 1))
        _save(fig, path)
    return True


def representative_config(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs of the (device, model, training config) that the most method labels share, one per label
    (default knobs preferred, then table order). Ties: more runs, then smaller model, then sorted keys."""
    if runs.empty or runs["comp.weights"].isna().all():
        return runs.iloc[0:0]
    has = runs[runs[[f"comp.{c}" for c in PLANNER_COMPONENTS]].notna().any(axis=1)]
    groups = []
    for (device, model, train), part in has.groupby(["device_name", "model", "train_key"], sort=True):
        size = part["total_params"].max()
        groups.append((-part["method"].nunique(), -len(part), 0 if math.isnan(size) else size, device, model,
                       train, part))
    best = sorted(groups, key=lambda g: g[:6])[0][6]
    best = best.assign(_default=best["knobs"].ne("")).sort_values(["_default"], kind="mergesort")
    chosen = best.drop_duplicates("method").drop(columns="_default")
    return chosen.sort_values("method", key=lambda s: s.map(method_rank), kind="mergesort")


def breakdown_bars(runs: pd.DataFrame, path: Path) -> bool:
    """Stacked predicted components per method for the representative config, with measured peaks marked."""
    chosen = representative_config(runs)
    if chosen.empty:
        return False
    on_gpu = bool(chosen["cuda"].any())
    # CUDA context and allocator slack do not exist for CPU runs: show the tensor components only there.
    comps = [c for c in PLANNER_COMPONENTS
             if chosen[f"comp.{c}"].fillna(0).gt(0).any() and (on_gpu or c not in _OVERHEAD)]
    totals = chosen[[f"comp.{c}" for c in comps]].fillna(0).sum(axis=1)
    marks = pd.concat([totals, chosen["allocated_meas"], chosen["device_meas"]])
    unit, scale = unit_for(marks)
    plt = _pyplot()
    first = chosen.iloc[0]
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(chosen) + 4.0), 4.8))
        xs = list(range(len(chosen)))
        bottom = [0.0] * len(chosen)
        for comp in comps:
            heights = [float(v) / scale for v in chosen[f"comp.{comp}"].fillna(0)]
            overhead = _OVERHEAD.get(comp)
            ax.bar(xs, heights, bottom=bottom, width=0.6, color=component_color(comp),
                   hatch="//" if overhead else None, edgecolor="white" if overhead else None, linewidth=0,
                   label=f"{comp} ({overhead})" if overhead else comp)
            bottom = [b + h for b, h in zip(bottom, heights)]
        hatched = any(c in _OVERHEAD for c in comps)
        markers = (("allocated_meas", "D", "measured allocated" + (" (vs solid part)" if hatched else "")),
                   ("device_meas", "X", "measured device (vs whole bar)"))
        for column, marker, label in markers:
            vals = chosen[column]
            if vals.notna().any():
                ax.scatter([x for x, v in zip(xs, vals) if not math.isnan(v)],
                           [v / scale for v in vals if not math.isnan(v)], marker=marker, color="black",
                           s=36, zorder=3, label=label)
        labels = [m + ("" if not k else "\n" + k.replace(" ", "\n")) for m, k in zip(chosen["method"], chosen["knobs"])]
        ax.set_xticks(xs, labels)
        ax.set_ylabel(f"memory per GPU at the peak ({unit})" if on_gpu else f"tensor bytes at the peak ({unit})")
        ax.set_title(f"Predicted breakdown: {first['model']}\nb={fmt_num(first['b'])}, s={fmt_num(first['s'])}, "
                     f"checkpointing {first['ckpt']}, {first['precision']}, {first['optimizer']}")
        ax.grid(True, axis="y", linewidth=0.4, alpha=0.5)
        handles, names = ax.get_legend_handles_labels()
        measured = [(h, n) for h, n in zip(handles, names) if n.startswith("measured")]
        bars = [(h, n) for h, n in zip(handles, names) if not n.startswith("measured")][::-1]  # stack top first
        others = measured
        legend = bars + others
        ax.legend([h for h, _ in legend], [n for _, n in legend], loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)
        fig.tight_layout()
        _save(fig, path)
    return True


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto front: points no other point beats on both lower memory and higher tokens/s."""
    front, best = [], -math.inf
    for mem, speed in sorted(points, key=lambda p: (p[0], -p[1])):
        if speed > best:
            front.append((mem, speed))
            best = speed
    return front


def pareto(runs: pd.DataFrame, path: Path, gpu: tuple[str, float] | None = None) -> bool:
    """tokens/s vs measured peak, one panel per model, each method's Pareto front drawn as a line.

    ``gpu`` (name, memory bytes) draws the GPU's memory as a vertical line on panels whose device-level
    peaks reach half of it."""
    ok = runs[runs["status"].eq("ok") & runs["tokens_per_s"].gt(0)]
    use_device = not ok.empty and ok["device_meas"].notna().all()
    column = "device_meas" if use_device else "allocated_meas"
    ok = ok[ok[column].gt(0)]
    if ok.empty:
        return False
    models = list(dict.fromkeys(ok["model"]))
    unit, scale = unit_for(ok[column])
    plt = _pyplot()
    with plt.rc_context(_RC):
        cols = min(3, len(models))
        rows = math.ceil(len(models) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols + 2.0, 3.9 * rows), squeeze=False)
        seen: dict[str, Any] = {}
        for ax, model in zip(axes.flat, models):
            part = ok[ok["model"] == model]
            for method in _methods(part):
                sel = part[part["method"] == method]
                pts = list(zip(sel[column] / scale, sel["tokens_per_s"]))
                h = ax.scatter(*zip(*pts), s=20, color=method_color(method), marker=method_marker(method),
                               alpha=0.8, edgecolors="none")
                fx, fy = zip(*_front(pts))
                ax.plot(fx, fy, color=method_color(method), linewidth=1.2, drawstyle="steps-post")
                seen.setdefault(method, h)
            top = part[column].max()
            if gpu and use_device and top >= 0.5 * gpu[1]:
                limit = ax.axvline(gpu[1] / scale, color="red", linestyle=":", linewidth=1.2)
                seen.setdefault(f"{gpu[0]} memory", limit)
            if _wide(part[column]):
                _log_axis(ax.xaxis)
            if _wide(part["tokens_per_s"]):
                _log_axis(ax.yaxis)
            else:
                _thousands(ax.yaxis)
            ax.set_title(model)
            ax.set_xlabel(f"measured {'device' if use_device else 'allocated'} peak ({unit})")
            ax.set_ylabel("tokens/s (measured)")
            ax.grid(True, linewidth=0.4, alpha=0.5)
        for ax in list(axes.flat)[len(models):]:
            ax.set_visible(False)
        order = [m for m in METHOD_ORDER if m in seen] + sorted(m for m in seen if m not in METHOD_ORDER)
        fig.legend([seen[m] for m in order], order, loc="center right", frameon=False,
                   title="lines: each method's\nPareto front")
        fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
        _save(fig, path)
    return True
