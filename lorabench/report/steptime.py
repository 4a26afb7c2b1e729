"""The step-time validation report: predicted vs measured per configuration, errors on the held-out half,
ratios, and a scatter plot per method (matplotlib is imported only by :func:`scatter`)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from lorabench.render import render
from lorabench.steptime.fit import Run

_SIZE = {64: "small", 256: "medium", 768: "large"}


def size_name(run: Run) -> str:
    return _SIZE.get(run.model.hidden_size, f"h{run.model.hidden_size}")


def error_rows(scored: list[tuple[Run, float, float]], half: str) -> list[dict[str, str]]:
    return [{"half": half, "size": size_name(r), "method": r.method.name,
             "ckpt": "on" if r.train.gradient_checkpointing else "off", "repeats": str(r.repeats),
             "measured ms": f"{1e3 * r.measured_s:.1f}", "predicted ms": f"{1e3 * p:.1f}", "error": f"{100 * e:+.1f}%"}
            for r, p, e in sorted(scored, key=lambda x: (x[0].model.hidden_size, x[0].method.name,
                                                         x[0].train.gradient_checkpointing))]


def summary(scored: list[tuple[Run, float, float]]) -> dict[str, float]:
    errs = [abs(e) for _, _, e in scored]
    return {"n": len(errs), "median": statistics.median(errs), "max": max(errs)}


def per_method(scored: list[tuple[Run, float, float]]) -> list[dict[str, str]]:
    out = []
    for name in sorted({r.method.name for r, _, _ in scored}):
        errs = [abs(e) for r, _, e in scored if r.method.name == name]
        out.append({"method": name, "configs": str(len(errs)), "median abs error": f"{100 * statistics.median(errs):.1f}%",
                    "max abs error": f"{100 * max(errs):.1f}%"})
    return out


def sweep_ratios(runs: list[Run], predicted: dict[str, float]) -> list[dict[str, str]]:
    """Ratios of the sweep's medians (separate processes, so load drift enters) next to the model's."""
    by = {(size_name(r), r.method.name, r.train.gradient_checkpointing): r for r in runs}
    out = []
    for size in ("small", "medium", "large"):
        for label, a, b in (("checkpointing on/off (lora)", ("lora", False), ("lora", True)),
                            ("full/lora", ("lora", False), ("full", False)),
                            ("qlora/lora (default targets)", ("lora", False), ("qlora", False))):
            ra, rb = by.get((size, *a)), by.get((size, *b))
            if ra and rb:
                out.append({"size": size, "ratio": label, "measured": f"{rb.measured_s / ra.measured_s:.2f}",
                            "predicted": f"{predicted[rb.key] / predicted[ra.key]:.2f}"})
    return out


def pair_rows(doc: dict[str, Any], predict_ratio: Any) -> list[dict[str, str]]:
    """Rows of ratios.json; ``predict_ratio(row)`` re-predicts with the fitted calibration."""
    return [{"size": r["size"], "ratio": r["ratio"], "measured (median of rounds)": f"{r['measured_ratio']:.2f}",
             "rounds": " ".join(f"{x:.2f}" for x in r["round_ratios"]), "predicted": f"{predict_ratio(r):.2f}"}
            for r in doc["rows"]]


def scatter(fit_half: list[tuple[Run, float, float]], score_half: list[tuple[Run, float, float]], path: Path) -> None:
    """Predicted vs measured step time (log-log), one colour per method; held-out half filled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    methods = sorted({r.method.name for r, _, _ in fit_half + score_half})
    colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for half, filled in ((fit_half, False), (score_half, True)):
        for r, p, _ in half:
            ax.scatter(1e3 * r.measured_s, 1e3 * p, s=42, marker="o" if not r.train.gradient_checkpointing else "s",
                       facecolors=colours[r.method.name] if filled else "none", edgecolors=colours[r.method.name])
    lo = min(1e3 * min(r.measured_s, p) for r, p, _ in fit_half + score_half) * 0.8
    hi = max(1e3 * max(r.measured_s, p) for r, p, _ in fit_half + score_half) * 1.25
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
    for k in (0.85, 1.15):
        ax.plot([lo, hi], [lo * k, hi * k], color="grey", lw=0.5, ls=":")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured step time (ms, CPU, 1 thread)",
           ylabel="predicted step time (ms)", title="lorabench step-time model vs real CPU runs")
    for name in methods:
        ax.scatter([], [], color=colours[name], label=name)
    ax.scatter([], [], facecolors="none", edgecolors="k", label="fit half (hollow)")
    ax.scatter([], [], color="k", marker="s", label="checkpointing (square)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(sections: list[tuple[str, str | list[dict[str, str]]]]) -> str:
    parts = []
    for title, body in sections:
        parts.append(f"## {title}\n" if title else "")
        parts.append(body if isinstance(body, str) else render(body, "markdown"))
        parts.append("")
    return "\n".join(parts)
