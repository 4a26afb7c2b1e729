"""The calibration's outputs: provenance from the records, conf/calibration/<gpu>.yaml, the report lines, and
:func:`calibrate` (load, fit on the fit half, score the held-out half and the probes, write)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lorabench.calibrate.fit import (ROOT, SPLIT_SALT, TARGET_MAX_ABS_REL_ERR, TARGET_MEDIAN_ABS_REL_ERR, Calibration,
                                     Check, Refusal, allocated_residuals, check, fit, half, is_measured_gpu_run,
                                     load_records)


# ---------------------------------------------------------------------------------------------- provenance
def provenance(runs: list[dict[str, Any]], paths: list[str]) -> dict[str, Any]:
    """Where a fit came from: files, counts, git commits and dates of the records themselves."""
    commits = Counter(str((r.get("env") or {}).get("git_commit", "unknown")) for r in runs)
    dates = sorted({str(r.get("timestamp", ""))[:10] for r in runs if r.get("timestamp")})
    env = Counter((str((r.get("env") or {}).get("device_name")), str((r.get("env") or {}).get("driver")),
                   str((r.get("env") or {}).get("torch"))) for r in runs).most_common(1)[0][0]
    return {"records": [_repo_relative(p) for p in paths if Path(p).is_file()],
            "git_commits": dict(commits.most_common()),
            "records_dates": f"{dates[0]}..{dates[-1]}" if len(dates) > 1 else (dates[0] if dates else "unknown"),
            "device_name": env[0], "driver": env[1], "torch": env[2]}


def _repo_relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def calibration_doc(cal: Calibration, gpu: str, fit_runs: list[dict[str, Any]], result: Check,
                    prov: dict[str, Any]) -> dict[str, Any]:
    """The YAML document of conf/calibration/<gpu>.yaml."""
    commit = next(iter(prov["git_commits"]))
    source = (f"fit by lorabench calibrate on {len(fit_runs)} ok cuda runs of {', '.join(prov['records'])} "
              f"(git {commit[:12]}, records dated {prov['records_dates']}, {prov['device_name']}); held-out "
              f"{len(result.heldout)} runs: median |err| {100 * result.median_abs_rel_err:.2f}%, max "
              f"{100 * result.max_abs_rel_err:.2f}% on NVML device peak")
    return {"source": source, **asdict(cal), "fit": {
        "gpu": gpu, "split": f"sha1('{SPLIT_SALT}' + run_id) even -> fit, odd -> held out",
        "runs_fit": len(fit_runs), "runs_heldout": len(result.heldout), "probes": len(result.probes),
        "probe_verdicts_right": sum(v.right for v in result.probes), **prov,
        "heldout_median_abs_rel_err": round(result.median_abs_rel_err, 5),
        "heldout_max_abs_rel_err": round(result.max_abs_rel_err, 5)}}


def write_yaml(path: Path, doc: dict[str, Any]) -> None:
    import yaml

    header = ("# Device overheads of the planner for this GPU, FITTED from GPU records by `lorabench calibrate`\n"
              "# (docs/GPU_CAMPAIGN.md). Regenerate it rather than editing it; `fit` says where it came from.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False, width=120))


def report_lines(result: Check) -> list[str]:
    lines = [f"held-out: {len(result.heldout)} runs, median |err| {100 * result.median_abs_rel_err:.2f}%, "
             f"max |err| {100 * result.max_abs_rel_err:.2f}% on NVML device peak "
             f"(targets {100 * TARGET_MEDIAN_ABS_REL_ERR:.0f}% / {100 * TARGET_MAX_ABS_REL_ERR:.0f}%)",
             "worst held-out runs (error parts: allocated + slack + context, as % of the measured device peak):"]
    lines += [f"  {100 * e.rel_err:+6.2f}% = {100 * e.allocated_part:+.2f} + {100 * e.slack_part:+.2f} + "
              f"{100 * e.context_part:+.2f}  {e.label} ({e.run_id})" for e in result.worst()]
    right = sum(v.right for v in result.probes)
    lines.append(f"probes: {right}/{len(result.probes)} verdicts right")
    lines += [f"  {'right' if v.right else 'WRONG'}: {v.label} predicted {'fit' if v.predicted_fits else 'OOM'} "
              f"(reserved {v.predicted_reserved_bytes / 2**30:.2f} GiB), measured {'ok' if v.measured_fits else 'oom'}"
              for v in result.probes]
    failures = result.failures()
    lines.append("targets met" if not failures else "targets MISSED:\n  " + "\n  ".join(failures))
    return lines


def calibrate(paths: list[str], gpu: str | None, out: Path | None, no_write: bool) -> dict[str, Any]:
    """Load, fit on the fit half, score the held-out half and the probes, write the YAML. Raises Refusal."""
    records = load_records(paths)
    runs = [r for r in records if is_measured_gpu_run(r)]
    if not runs:
        raise Refusal(f"no GPU records (status ok, device cuda, uncapped, with torch and NVML peaks) in "
                      f"{', '.join(_repo_relative(p) for p in paths)}; run the GPU campaign first "
                      "(docs/GPU_CAMPAIGN.md)")
    gpus = sorted({str(r["config"].get("gpu")) for r in runs})
    if gpu is None and len(gpus) > 1:
        raise Refusal(f"the records hold runs of several GPUs ({', '.join(gpus)}); pass --gpu NAME")
    gpu = gpu or gpus[0]
    if gpu == "None":
        raise Refusal("the GPU records name no catalog gpu (config.gpu is null); re-run them with gpu=<catalog name>")
    records = [r for r in records if str(r["config"].get("gpu")) == gpu]
    runs = [r for r in runs if str(r["config"].get("gpu")) == gpu]
    fit_runs = [r for r in runs if half(r["run_id"]) == "fit"]
    cal = fit(fit_runs)
    result = check(records, cal).get(gpu, Check(gpu))
    doc = calibration_doc(cal, gpu, fit_runs, result, provenance(runs, paths))
    doc["fit"]["allocated_residual_bytes"] = allocated_residuals(fit_runs)
    target = out or ROOT / "conf" / "calibration" / f"{gpu}.yaml"
    if not no_write:
        write_yaml(target, doc)
    return {"calibration": doc, "report": report_lines(result), "written": None if no_write else str(target),
            "failures": result.failures()}
