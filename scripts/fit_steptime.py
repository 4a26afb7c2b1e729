"""Fit the step-time model's efficiencies on half of a sweep's records, score it on the other half, and
write the calibration (conf/calibration/time-<device>.yaml) and the report (reports/<sweep>/README.md + PNG).

    python scripts/fit_steptime.py results/cpu-time --device cpu-epyc-1t

Records of one configuration (repeats differ by seed) are pooled (median of their median step times) and
land in the same half (lorabench.steptime.fit.split), so the scored half holds configurations the fit never
saw. ``ratios.json`` next to the records (scripts/bench_cpu_ratios.py) adds the side-by-side ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from lorabench.catalog import CONF_DIR, load_gpu
from lorabench.records import read_records
from lorabench.report import steptime as rep
from lorabench.steptime import calibration, fit
from lorabench.steptime.model import predict_time


def _pair_ratio(row: dict, settings: dict, device, cal) -> float:  # type: ignore[no-untyped-def]
    """B/A step time predicted with the fitted calibration for a row of ratios.json."""
    from lorabench.architectures import spec_from_hf_config
    from lorabench.catalog import load_model
    from lorabench.methods import make_config
    from lorabench.specs import TrainSpec

    base = load_model("tiny-llama")
    spec = spec_from_hf_config({**base.hf_config, **row["hf_config_overrides"]}, name=base.name) \
        if row["hf_config_overrides"] else base
    times = []
    for method, knobs, ckpt in (row["a"], row["b"]):
        train = TrainSpec(micro_batch_size=settings["batch"], seq_len=settings["seq_len"], precision="bf16",
                          gradient_checkpointing=ckpt)
        times.append(predict_time(spec, make_config(method, knobs), train, device, cal).step_time_s)
    return times[1] / times[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep", type=Path, help="results/<sweep> (records.jsonl, optional ratios.json)")
    ap.add_argument("--device", required=True, help="catalog entry the runs ran on (conf/cpu or conf/gpu)")
    ap.add_argument("--report", type=Path, default=None, help="default reports/<sweep name>")
    ap.add_argument("--no-write-calibration", action="store_true")
    args = ap.parse_args()
    device = load_gpu(args.device)
    records, warnings = read_records(args.sweep / "records.jsonl")
    runs = fit.runs_from_records(records)
    fit_half, score_half = fit.split(runs)
    defaults = calibration.load(None)
    cal = fit.fit(fit_half, device, defaults)
    cal = calibration.TimeCalibration(cal.efficiency, cal.kernel_overhead_s,
                                      f"fitted on {len(fit_half)} of {len(runs)} configurations of "
                                      f"{args.sweep.as_posix()} (scripts/fit_steptime.py)", cal.forward_op_overhead_s)
    scored_fit, scored = fit.errors(fit_half, device, cal), fit.errors(score_half, device, cal)
    s_fit, s_score = rep.summary(scored_fit), rep.summary(scored)
    print(f"fit half   n={s_fit['n']} median {100 * s_fit['median']:.1f}% max {100 * s_fit['max']:.1f}%")
    print(f"score half n={s_score['n']} median {100 * s_score['median']:.1f}% max {100 * s_score['max']:.1f}%")
    if not args.no_write_calibration:
        path = CONF_DIR / "calibration" / f"time-{device.name}.yaml"
        header = (f"# Fitted by scripts/fit_steptime.py on {len(fit_half)} configurations of {args.sweep.as_posix()};\n"
                  f"# scored on the other {len(score_half)}: median |error| {100 * s_score['median']:.1f}%, "
                  f"max {100 * s_score['max']:.1f}% (reports/{args.sweep.name}/README.md).\n")
        path.write_text(header + yaml.safe_dump(cal.to_yaml_doc(), sort_keys=False))
    predicted = {r.key: predict_time(r.model, r.method, r.train, device, cal).step_time_s for r in runs}
    out = args.report or Path("reports") / args.sweep.name
    rep.scatter(scored_fit, scored, out / "steptime.png")
    loads = [r["env"].get("load_average", [None])[0] for r in records if r.get("env", {}).get("load_average")]
    commits = sorted({r["env"]["git_commit"][:7] for r in records if r.get("env")})
    ok = sum(r.get("status") == "ok" for r in records)
    env = records[0]["env"]
    intro = (f"{ok} ok records of {len(records)} ({len(runs)} configurations, "
             f"{statistics.median([r.repeats for r in runs]):.0f} repeats each) on {env['device_name']}, "
             f"1 thread, torch {env['torch']}, transformers {env['transformers']}, commit(s) {', '.join(commits)} "
             "(kept reachable by the tags `runs/cpu-time-*`). "
             f"CPU timings on a SHARED machine (other jobs ran on its 2 cores): 1-minute load average "
             f"{min(loads):.1f}-{max(loads):.1f} (median {statistics.median(loads):.1f}) across the runs. "
             "These are CPU figures, never GPU ones.\n\n"
             f"Device entry: `conf/cpu/{device.name}.yaml` (bf16 matmul {device.bf16_flops_per_s / 1e9:.0f} GFLOP/s, "
             f"copy bandwidth {device.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s, measured by "
             "scripts/bench_cpu_device.py). Fitted calibration (fit half only): "
             + ", ".join(f"{k} {v:.3g}" for k, v in cal.efficiency.items() if k != "communication")
             + f"; per-op overhead {1e6 * cal.kernel_overhead_s:.1f} us, forward ops +{1e6 * cal.forward_op_overhead_s:.1f} us.")
    sections: list = [("", f"# Step-time model vs real CPU runs ({args.sweep.name})\n\n" + intro),
                      ("Error on the held-out half",
                       f"median |error| **{100 * s_score['median']:.1f}%**, max {100 * s_score['max']:.1f}% over "
                       f"{s_score['n']} configurations the fit never saw (fit half: median {100 * s_fit['median']:.1f}%, "
                       f"max {100 * s_fit['max']:.1f}%).\n\n![predicted vs measured](steptime.png)"),
                      ("Per method (held-out half)", rep.per_method(scored)),
                      ("Ratios from the sweep's medians (separate processes)", rep.sweep_ratios(runs, predicted))]
    summary = {"configurations": len(runs), "records_ok": ok,
                "score": {"n": s_score["n"], "median_pct": 100 * s_score["median"], "max_pct": 100 * s_score["max"]},
                "fit": {"n": s_fit["n"], "median_pct": 100 * s_fit["median"], "max_pct": 100 * s_fit["max"]},
                "load_average": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
                "per_method_median_pct": {row["method"]: float(row["median abs error"].rstrip("%"))
                                          for row in rep.per_method(scored)}, "pairs": {}}
    ratios = args.sweep / "ratios.json"
    if ratios.is_file():
        doc = json.loads(ratios.read_text())
        for row in doc["rows"]:
            summary["pairs"][f"{row['size']} {row['ratio']}"] = {
                "measured": row["measured_ratio"], "predicted": _pair_ratio(row, doc["settings"], device, cal)}
        sections.append(("Ratios measured side by side in one process (scripts/bench_cpu_ratios.py)",
                         f"Alternating steps A B A B, {doc['settings']['steps_per_round']} per round, "
                         f"{doc['settings']['rounds']} rounds, ratio of medians; load average "
                         f"{doc['env'].get('load_average_before', ['?'])[0]} at the start, commit "
                         f"{doc['env']['git_commit'][:7]}. QLoRA is compared with LoRA on the same (all-linear) targets."))
        sections.append(("", rep.pair_rows(doc, lambda row: _pair_ratio(row, doc["settings"], device, cal))))
    sections.append(("Every configuration", rep.error_rows(scored, "score") + rep.error_rows(scored_fit, "fit")))
    if warnings:
        sections.append(("Warnings", "\n".join(f"- {w}" for w in warnings)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(rep.markdown(sections))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
