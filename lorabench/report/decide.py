"""Decision tables: which fine-tuning method fits a model on a GPU, how large a micro-batch, how fast.

:func:`decision_table` asks the planner (``lorabench.memory.planner``) about each of the six methods
with its default knobs and adds the measured tokens/s of a matching run record when one exists. Used
by ``lorabench report`` (one table per model of a sweep) and by ``lorabench compare``. Torch-free;
pandas only when a records frame is passed.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

from lorabench.methods import METHOD_NAMES, make_config
from lorabench.specs import GpuSpec, ModelSpec, TrainSpec

#: Keys of each decision row, in table order.
DECISION_KEYS: tuple[str, ...] = (
    "method", "fits", "headroom_bytes", "max_micro_batch", "peak_allocated_bytes", "device_bytes",
    "trainable_params", "total_params", "trainable_fraction", "tokens_per_s",
)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _measured_tokens_per_s(records_df: Any, model: ModelSpec, method: str, train: TrainSpec) -> float | None:
    """Median tokens/s of the ok records for this model, the method's default knobs and this train config."""
    if records_df is None or len(records_df) == 0:
        return None
    wanted_method = make_config(method).to_dict()
    wanted_train = train.to_record()
    speeds = []
    for _, row in records_df.iterrows():
        if row.get("status") != "ok" or row.get("config.model") != model.name:
            continue
        knobs = {k[len("config.method."):]: row[k] for k in row.index if k.startswith("config.method.")}
        if any(_differs(knobs.get(k), v) for k, v in wanted_method.items()):
            continue
        train_row = {k[len("config.train."):]: row[k] for k in row.index if k.startswith("config.train.")}
        if any(k in train_row and _differs(train_row[k], v) for k, v in wanted_train.items()):
            continue
        speed = row.get("measured.tokens_per_s")
        if not _is_missing(speed):
            speeds.append(float(speed))
    if not speeds:
        return None
    speeds.sort()
    mid = len(speeds) // 2
    return speeds[mid] if len(speeds) % 2 else (speeds[mid - 1] + speeds[mid]) / 2


def _differs(recorded: Any, wanted: Any) -> bool:
    """Compare a flat-frame value with a config value (lists come back as lists, None as NaN)."""
    if _is_missing(recorded) and wanted is None:
        return False
    if isinstance(wanted, (list, tuple)) or isinstance(recorded, (list, tuple)):
        return list(recorded or []) != list(wanted or [])
    if hasattr(recorded, "item"):
        recorded = recorded.item()
    return recorded != wanted


def decision_table(model_spec: ModelSpec, gpu_spec: GpuSpec, train: TrainSpec | Callable[[str], TrainSpec],
                   records_df: Any = None) -> list[dict[str, Any]]:
    """One row per method (default knobs): does it fit, how large a micro-batch, predicted peak, speed.

    Args:
        model_spec: the model.
        gpu_spec: the GPU the verdict is for.
        train: the training configuration (its micro_batch_size is the one ``fits`` judges), or a function
            method name -> TrainSpec when methods train differently (e.g. full FT in bf16-mixed).
        records_df: optional :func:`lorabench.records.load` frame; its ok runs of this model with the
            method's default knobs and this training configuration give ``tokens_per_s`` (median).

    Returns:
        Dicts with :data:`DECISION_KEYS`: ``fits`` (bool), ``headroom_bytes`` (GPU memory minus predicted
        device bytes), ``max_micro_batch`` (0 when not even b=1 fits), ``peak_allocated_bytes`` and
        ``device_bytes`` (predicted), ``trainable_params``, ``total_params``, ``trainable_fraction``
        (trainable / total) and ``tokens_per_s`` (None without a matching record).
    """
    from lorabench.memory import planner

    rows = []
    for method in METHOD_NAMES:
        config = make_config(method)
        method_train = train(method) if callable(train) else train
        prediction = planner.predict(model_spec, config, method_train, gpu_spec)
        verdict = planner.fits(prediction, gpu_spec)
        total = int(prediction.total_params)
        rows.append({
            "method": method,
            "fits": bool(verdict.fits),
            "headroom_bytes": int(verdict.headroom_bytes),
            "max_micro_batch": int(planner.max_micro_batch(model_spec, config, method_train, gpu_spec)),
            "peak_allocated_bytes": int(prediction.peak_allocated_bytes),
            "device_bytes": int(prediction.device_bytes),
            "trainable_params": int(prediction.trainable_params),
            "total_params": total,
            "trainable_fraction": prediction.trainable_params / total if total else math.nan,
            "tokens_per_s": _measured_tokens_per_s(records_df, model_spec, method, method_train),
        })
    return rows


def micro_batch_limit() -> int:
    """The largest micro-batch the planner's search tries (its ``limit`` default)."""
    import inspect

    from lorabench.memory import planner

    return int(inspect.signature(planner.max_micro_batch).parameters["limit"].default)


def decision_markdown(rows: list[dict[str, Any]]) -> str:
    """A decision table as GitHub markdown (no pandas needed).

    Headroom is in GiB (GPU scale); the predicted peaks share one unit: GiB when the largest predicted
    device peak is at least 1 GiB, else MiB.
    A max micro-batch at the planner's search limit is shown as ``>= limit``.
    """
    from tabulate import tabulate

    unit, scale = ("GiB", 2**30) if max((r["device_bytes"] for r in rows), default=0) >= 2**30 else ("MiB", 2**20)
    digits = 3 if unit == "GiB" else 1
    limit = micro_batch_limit()
    headers = ["method", "fits", "headroom (GiB)", "max micro-batch", f"predicted peak alloc ({unit})",
               f"predicted device ({unit})", "trainable params", "trainable %", "measured tokens/s"]
    body = []
    for r in rows:
        pct = r["trainable_fraction"]
        mem = [f"{r['headroom_bytes'] / 2**30:,.3f}"]
        mem += [f"{r[k] / scale:,.{digits}f}" for k in ("peak_allocated_bytes", "device_bytes")]
        batch = f">= {limit}" if r["max_micro_batch"] >= limit else str(r["max_micro_batch"])
        body.append([
            r["method"], "yes" if r["fits"] else "no", mem[0], batch, mem[1], mem[2], f"{r['trainable_params']:,}",
            "—" if _is_missing(pct) else f"{pct * 100:.3f}%",
            "not measured" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.1f}",
        ])
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def representative_train(records_df: Any, model_name: str) -> TrainSpec | None:
    """The training configuration most runs of ``model_name`` share.

    Ties go to the cheapest configuration: smaller micro-batch, then shorter sequence, then checkpointing
    off, then the canonical JSON text.
    """
    counts: dict[str, int] = {}
    for _, row in records_df.iterrows():
        if row.get("config.model") != model_name:
            continue
        train = {k[len("config.train."):]: _plain(row[k]) for k in row.index
                 if k.startswith("config.train.") and not _is_missing(row[k])}
        key = json.dumps(train, sort_keys=True)
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None

    def rank(item: tuple[str, int]) -> tuple[Any, ...]:
        t = json.loads(item[0])
        return (-item[1], t.get("micro_batch_size", 0), t.get("seq_len", 0),
                bool(t.get("gradient_checkpointing")), item[0])

    return TrainSpec.from_record(json.loads(sorted(counts.items(), key=rank)[0][0]))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
