"""The per-rank section of a report: each multi-device run's measured peak on every rank beside the
planner's per-GPU prediction (records with ``measured.per_rank_peak_bytes``; torch-free, no pandas)."""

from __future__ import annotations

from typing import Any

from lorabench.memory.categories import TRACE_CATEGORIES, to_trace_categories
from lorabench.report.tables import md

#: The planner's per-rank accuracy bound checked on CPU sharded runs (tests/runtime/test_distributed.py).
PER_RANK_BOUND = 0.03


def _mib(value: float) -> str:
    return f"{value / 2**20:.3f}"


def _moment(predicted: dict[str, Any]) -> str:
    """The planner's peak moment (the largest of its ``phase_peaks`` candidates)."""
    peaks = predicted.get("phase_peaks") or {}
    return max(peaks, key=lambda k: peaks[k]) if peaks else str(predicted.get("phase") or "-")


def _row(record: dict[str, Any]) -> tuple[list[str], list[float]]:
    cfg, measured, predicted = record["config"], record["measured"], record["predicted"] or {}
    train = cfg["train"]
    pred = predicted.get("peak_allocated_bytes")
    peaks = measured["per_rank_peak_bytes"]
    errors = [(pred - p) / p for p in peaks if p and pred]
    ranks = measured.get("per_rank") or []
    overrides = cfg.get("model_hf_config_overrides") or {}
    model = " ".join([cfg["model"]] + [f"{k}={v}" for k, v in sorted(overrides.items())])
    cells = [model, cfg["method"]["method"], train["sharding"], str(train["num_gpus"]),
             "on" if train["gradient_checkpointing"] else "off", train["precision"],
             _mib(pred) if pred else "-", " / ".join(_mib(p) if p else "-" for p in peaks),
             " / ".join(f"{100 * e:+.2f}%" for e in errors) or "-",
             " / ".join(sorted({str((r or {}).get("phase")) for r in ranks})),
             _moment(predicted)]
    return cells, errors


def _components(record: dict[str, Any]) -> str:
    """Tracker categories of every rank beside the planner's, for the run with the largest error."""
    predicted = to_trace_categories(record["predicted"]["components"])
    rows = [[c, _mib(predicted[c])] + [_mib((r or {}).get("components", {}).get(c, 0)) for r in
                                       record["measured"]["per_rank"]] for c in TRACE_CATEGORIES]
    n = len(record["measured"]["per_rank"])
    return md(rows, ["category (MiB)", "predicted"] + [f"rank {i}" for i in range(n)])


def _summary(runs: list[dict[str, Any]]) -> str:
    """Per sharding: runs, ranks, median and max |error| over all ranks, runs within the bound."""
    rows = []
    for sharding in ("none", "zero1", "zero2", "zero3"):
        part = [r for r in runs if r["config"]["train"]["sharding"] == sharding]
        errors = sorted(abs(e) for r in part for e in _row(r)[1])
        if not errors:
            continue
        within = sum(1 for r in part if all(abs(e) <= PER_RANK_BOUND for e in _row(r)[1]))
        rows.append([sharding, str(len(part)), str(len(errors)), f"{100 * errors[len(errors) // 2]:.2f}%",
                     f"{100 * errors[-1]:.2f}%", f"{within}/{len(part)}"])
    return md(rows, ["sharding", "runs", "ranks", "median abs err", "max abs err",
                     f"runs within ±{100 * PER_RANK_BOUND:.0f}%"])


def per_rank_section(records: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the section ([] when no record has per-rank peaks)."""
    runs = [r for r in records if r.get("status") == "ok" and (r.get("measured") or {}).get("per_rank_peak_bytes")]
    if not runs:
        return []
    rows, worst, worst_run = [], 0.0, runs[0]
    for record in runs:
        cells, errors = _row(record)
        rows.append(cells)
        if errors and max(abs(e) for e in errors) >= worst:
            worst, worst_run = max(abs(e) for e in errors), record
    within = sum(1 for r in runs if all(abs(e) <= PER_RANK_BOUND for e in _row(r)[1]))
    cfg = worst_run["config"]
    return ["## Per rank (multi-device runs)", "",
            "Each rank's measured tensor peak (the live-storage tracker on the CPU, "
            "`torch.cuda.max_memory_allocated` on a GPU) beside the planner's per-GPU prediction; "
            "error = (predicted - measured) / measured per rank. Phases: the tracker's per rank, the "
            "planner's peak moment.", "",
            f"{within} of {len(runs)} runs within ±{100 * PER_RANK_BOUND:.0f}% on every rank; "
            f"worst {100 * worst:.2f}%.", "",
            "### Per-rank error by sharding", "", _summary(runs), "",
            "### Every multi-device run", "",
            md(rows, ["model", "method", "sharding", "N", "ckpt", "precision", "predicted MiB",
                      "measured MiB per rank", "error per rank", "measured phase", "predicted moment"]), "",
            "### Categories of the worst run", "",
            f"{cfg['method']['method']}, {cfg['train']['sharding']}, ckpt "
            f"{'on' if cfg['train']['gradient_checkpointing'] else 'off'}, {cfg['train']['precision']}"
            f"{', ' + str(cfg.get('model_hf_config_overrides')) if cfg.get('model_hf_config_overrides') else ''}:",
            "",
            _components(worst_run), ""]
