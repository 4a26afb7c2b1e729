"""Step time, tokens/s, MFU, time to train and cost as plan/compare print them (torch-free)."""

from __future__ import annotations

from typing import Any

from lorabench.methods.base import MethodConfig
from lorabench.specs import GpuSpec, ModelSpec, TrainSpec
from lorabench.steptime import calibration
from lorabench.steptime.cost import TrainingBudget, summary
from lorabench.steptime.model import StepTime, predict_time
from lorabench.units import seconds, usd


def predict(model: ModelSpec, method: MethodConfig, train: TrainSpec, gpu: GpuSpec) -> StepTime:
    return predict_time(model, method, train, gpu)


def cells(step: StepTime, budget: TrainingBudget, gpu: GpuSpec) -> dict[str, str]:
    """Table cells: step, tokens/s, MFU (+ time to train and cost with a token budget)."""
    s = summary(step, budget, gpu)
    out = {"step": seconds(step.step_time_s), "tokens/s": f"{step.tokens_per_s:,.0f}", "MFU": f"{100 * step.mfu:.1f}%"}
    if budget.tokens is not None:
        out["train time"] = seconds(float(s["train_time_s"] or 0))
        out["cost"] = usd(s["cost_usd"])
    return out


def line(step: StepTime, budget: TrainingBudget, gpu: GpuSpec) -> str:
    """One line under plan's breakdown."""
    s = summary(step, budget, gpu)
    text = (f"time on {gpu.name}: step {seconds(step.step_time_s)} | {step.tokens_per_s:,.0f} tokens/s | "
            f"MFU {100 * step.mfu:.1f}%")
    if budget.tokens is not None:
        price = s["usd_per_gpu_hour"]
        text += (f" | {budget.tokens:.3g} tokens in {seconds(float(s['train_time_s'] or 0))}, "
                 f"{usd(s['cost_usd'])}" + (f" at ${price:.2f}/GPU-h" if price is not None else " (no price known)"))
    source = calibration.load(gpu.name).source
    return text + f"\n(time model: {source or 'calibrated'})"


def json_fields(step: StepTime, budget: TrainingBudget, gpu: GpuSpec) -> dict[str, Any]:
    out: dict[str, Any] = dict(summary(step, budget, gpu))
    out["time_components_s"] = dict(step.components_s)
    out["time_device"] = gpu.name
    return out


#: Where each op class's formula is cited (docs/SOURCES.md anchors).
CLASS_SOURCES = {
    "matmul_forward": "kaplan", "matmul_input_grad": "frozen-flops", "matmul_weight_grad": "kaplan",
    "attention": "flash-attention-flops", "recompute": "frozen-flops", "adapter": "lora", "dequant": "qlora",
    "elementwise": "roofline", "loss": "roofline", "optimizer": "adamw-passes", "communication": "ring-collectives",
}


def explain_rows(step: StepTime, gpu: GpuSpec) -> list[dict[str, str]]:
    """Per op class: its time, the work behind it, the efficiency used and where the formula comes from."""
    cal = calibration.load(gpu.name)
    work: dict[str, list[float]] = {}
    for p in step.pieces:
        w = work.setdefault(p.report_as or p.cls, [0.0, 0.0, 0.0])
        w[0] += p.work.flops
        w[1] += p.work.bytes
        w[2] += p.work.kernels
    rows = []
    for cls, t in step.components_s.items():
        if cls not in work or not t:
            continue
        flops, nbytes, ops = work[cls]
        rows.append({"op class": cls, "time": seconds(t), "GFLOP": f"{flops / 1e9:,.1f}", "GB moved": f"{nbytes / 1e9:,.2f}",
                     "ops": f"{ops:,.0f}", "efficiency": f"{cal.efficiency.get(cls, 0):.2f}" if cls != "recompute" else "per class",
                     "source": f"docs/SOURCES.md#{CLASS_SOURCES[cls]}"})
    return rows
