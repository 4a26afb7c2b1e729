"""Tests of `lorabench report` (tables, figures, decisions, errors).

Every record here is a TEST FIXTURE built in this file (synthetic but well-formed schema-1 records with
made-up numbers); nothing is read from or written to results/ or reports/.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from lorabench.errors import UserError
from lorabench.memory.categories import PLANNER_COMPONENTS
from lorabench.records import append_record, run_id

GIB = 2**30
MIB = 2**20
H100_BYTES = 85520809984
PLANNER_AVAILABLE = importlib.util.find_spec("lorabench.memory.planner") is not None
needs_planner = pytest.mark.skipif(not PLANNER_AVAILABLE, reason="planner not yet available")

# ------------------------------------------------------------------------------------------ fixture builders
GPU_ENV = {"device_name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15", "cuda": "12.8", "torch": "2.11.0",
           "transformers": "5.17.0", "bitsandbytes": "0.50.2", "peft": "0.21.2", "python": "3.11.7",
           "platform": "Linux-x86_64", "git_commit": "a" * 40, "git_dirty": False}
CPU_ENV = dict(GPU_ENV, device_name="AMD EPYC", driver=None, cuda=None, torch="2.13.0+cpu", transformers="5.23.0")


def _method(name: str, **knobs: Any) -> dict[str, Any]:
    from lorabench.methods import make_config

    return make_config(name, knobs).to_dict()


def _train(b: int, s: int, ckpt: bool, precision: str = "bf16") -> dict[str, Any]:
    return {"micro_batch_size": b, "seq_len": s, "precision": precision, "gradient_checkpointing": ckpt,
            "attention": "sdpa", "optimizer": "adamw", "grad_accum_steps": 1, "num_gpus": 1, "sharding": "none",
            "master_weights": False}


def make_record(model: str, method: dict[str, Any], train: dict[str, Any], *, device: str = "cuda",
                gpu: str | None = "h100-80gb", status: str = "ok", components: dict[str, int] | None = None,
                measured: dict[str, Any] | None = None, traced: dict[str, Any] | None = None,
                fits: bool | None = None, total_params: int = 10**9, trainable_params: int = 10**6,
                env: dict[str, Any] | None = None, sweep: str = "fixture", seed: int = 0) -> dict[str, Any]:
    """A schema-1 record around the given numbers (the TEST FIXTURE every test builds on)."""
    config = {"model": model, "method": method, "train": train, "device": device, "gpu": gpu,
              "memory_cap_bytes": None, "warmup_steps": 1, "timed_steps": 2, "seed": seed}
    comps = {c: 0 for c in PLANNER_COMPONENTS}
    comps.update(components or {})
    alloc = sum(v for k, v in comps.items() if k not in ("cuda_context", "allocator_slack"))
    predicted = {"components": comps, "peak_allocated_bytes": alloc,
                 "reserved_bytes": alloc + comps["allocator_slack"],
                 "device_bytes": alloc + comps["allocator_slack"] + comps["cuda_context"], "host_bytes": 0,
                 "phase": "backward", "trainable_params": trainable_params, "total_params": total_params,
                 "fits": fits}
    base_measured = {"tracker": None, "torch_max_allocated_bytes": None, "torch_max_reserved_bytes": None,
                     "nvml_peak_used_bytes": None, "nvml_baseline_bytes": None, "nvml_process_peak_bytes": None,
                     "peak_rss_bytes": None, "step_time_s_median": 0.1, "step_time_s_p90": 0.12,
                     "tokens_per_s": None, "mfu": None, "loss_first": 10.0, "loss_last": 9.0, "nan_loss": False}
    base_measured.update(measured or {})
    return {"schema": 1, "run_id": run_id(config), "sweep": sweep, "status": status, "config": config,
            "predicted": predicted, "traced": traced, "measured": base_measured,
            "error": None if status == "ok" else f"{status} in step 1", "env": env or GPU_ENV,
            "timestamp": "2026-01-01T00:00:00Z"}


def _jitter(key: str, lo: float, hi: float) -> float:
    """A deterministic pseudo-random number in [lo, hi] from a string."""
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return lo + (hi - lo) * h


GPU_MODELS = {  # name: (params, hidden, layers, vocab)
    "qwen2.5-0.5b": (494_032_768, 896, 24, 151_936),
    "llama-3.2-1b": (1_235_814_400, 2048, 16, 128_256),
    "llama-2-7b": (6_738_415_616, 4096, 32, 32_000),
}
TRAINABLE_FRACTION = {"full": 1.0, "lora": 0.0006, "qlora": 0.006, "prefix": 0.0008, "adapters": 0.02, "ia3": 0.0001}


def gpu_sweep_records() -> list[dict[str, Any]]:
    """A realistic-looking H100 sweep: 3 models x 6 methods (+ QLoRA on bitsandbytes) x b x s x ckpt."""
    out = []
    for model, (params, hidden, layers, vocab) in GPU_MODELS.items():
        for name in ("full", "lora", "qlora", "qlora-bnb", "prefix", "adapters", "ia3"):
            method = _method("qlora", backend="bitsandbytes") if name == "qlora-bnb" else _method(name)
            kind = method["method"]
            for b in (1, 4):
                for s in (512, 2048):
                    for ckpt in (False, True):
                        out.append(_gpu_run(model, params, hidden, layers, vocab, kind, name, method, b, s, ckpt))
    return out


def _gpu_run(model: str, params: int, hidden: int, layers: int, vocab: int, kind: str, name: str,
             method: dict[str, Any], b: int, s: int, ckpt: bool) -> dict[str, Any]:
    trainable = int(params * TRAINABLE_FRACTION[kind])
    quant = kind == "qlora"
    t_bytes = (2 if kind == "full" else 4) * trainable
    act = b * s * hidden * layers * (4 if ckpt else 34) * (1.3 if kind == "adapters" else 1.0)
    comps = {
        "weights": int(params * (0.15 if quant else 1.0) * 2) if kind != "full" else 0,
        "quantized_weights": int(params * 0.85 * 0.5156) if quant else 0,
        "trainable": t_bytes, "gradients": t_bytes, "optimizer": 4 * t_bytes if kind == "full" else 2 * t_bytes,
        "activations": int(act), "logits": b * s * vocab * 6, "cuda_context": 512 * MIB,
    }
    alloc = sum(comps.values()) - comps["cuda_context"]
    comps["allocator_slack"] = max(int(alloc * 0.05), 32 * MIB)
    device_bytes = alloc + comps["allocator_slack"] + comps["cuda_context"]
    key = f"{model}/{name}/{b}/{s}/{ckpt}"
    fits = device_bytes <= H100_BYTES
    status = "ok" if fits else "oom"
    if key == "llama-2-7b/lora/4/2048/False":  # a missed OOM (the planner said it fits)
        status = "oom"
    if key == "qwen2.5-0.5b/prefix/4/2048/False":
        status = "failed"
    measured: dict[str, Any] = {}
    if status == "ok":
        meas_alloc = int(alloc / (1 + _jitter(key, -0.08, 0.12)))
        reserved = int(meas_alloc * _jitter(key + "r", 1.02, 1.12))
        baseline = 600 * MIB
        # step time ~ 6 P tokens / (400 TFLOP/s), + recompute with checkpointing, + dequantization for QLoRA
        flops = (6 if kind == "full" else 4) * params * b * s * (1.33 if ckpt else 1.0) * (1.35 if quant else 1.0)
        speed = b * s / (0.015 + flops / 4e14)
        measured = {"torch_max_allocated_bytes": meas_alloc, "torch_max_reserved_bytes": reserved,
                    "nvml_baseline_bytes": baseline,
                    "nvml_peak_used_bytes": reserved + int(_jitter(key + "c", 480, 560) * MIB),  # minus baseline
                    "tokens_per_s": round(speed * (0.8 if name == "qlora-bnb" else 1.0), 3)}
    traced = None
    if b == 1 and not ckpt and status == "ok":
        peak = int(measured["torch_max_allocated_bytes"] * _jitter(key + "t", 0.98, 1.01))
        cats = {"weights_frozen": comps["weights"], "quantized": comps["quantized_weights"],
                "weights_trainable": t_bytes, "gradients": t_bytes, "optimizer": comps["optimizer"]}
        cats["activations"] = max(peak - sum(cats.values()), 0)
        traced = {"components": cats, "phase": "backward", "seconds": 3.5, "peak_bytes": sum(cats.values())}
    return make_record(model, method, _train(b, s, ckpt), status=status, components=comps, measured=measured,
                       traced=traced, fits=fits, total_params=params, trainable_params=trainable,
                       sweep="gpu-validate")


def cpu_sweep_records() -> list[dict[str, Any]]:
    """A cpu-smoke-like sweep on tiny-llama with tracker components (MiB-sized)."""
    out = []
    params = 1_100_000
    for name in ("full", "lora", "qlora", "prefix", "adapters", "ia3"):
        for precision in ("fp32", "bf16"):
            for ckpt in (False, True):
                key = f"{name}/{precision}/{ckpt}"
                w = 4 if precision == "fp32" else 2
                trainable = int(params * TRAINABLE_FRACTION[name] * 50) if name != "full" else params
                t_bytes = (w if name == "full" else 4) * trainable
                comps = {"weights": 0 if name == "full" else (params * w // (5 if name == "qlora" else 1)),
                         "quantized_weights": int(params * 0.8 * 0.52) if name == "qlora" else 0,
                         "trainable": t_bytes, "gradients": t_bytes, "optimizer": 2 * t_bytes,
                         "activations": (300_000 if ckpt else 1_500_000) * w // 2, "logits": 2 * 64 * 32000 * 4}
                tracker = {"weights_frozen": comps["weights"], "quantized": comps["quantized_weights"],
                           "weights_trainable": t_bytes, "gradients": t_bytes,
                           "optimizer": int(2 * t_bytes * _jitter(key + "o", 0.98, 1.0)),
                           "activations": int((comps["activations"] + comps["logits"]) * _jitter(key, 0.85, 1.2))}
                measured = {"tracker": {"components": tracker, "peak_bytes": sum(tracker.values()), "phase": "backward"},
                            "peak_rss_bytes": 900 * MIB, "tokens_per_s": round(_jitter(key + "s", 800, 3000), 2)}
                out.append(make_record("tiny-llama", _method(name), _train(2, 64, ckpt, precision), device="cpu",
                                       gpu=None, components=comps, measured=measured, total_params=params,
                                       trainable_params=trainable, env=CPU_ENV, sweep="cpu-smoke"))
    return out


def cells(line: str) -> list[str]:
    """The stripped cells of one markdown table row."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    for r in records:
        append_record(path / "records.jsonl", r)
    return path


def build(results: Path, out: Path, gpu: str | None = None) -> tuple[str, list[str]]:
    from lorabench.report.build import build_report

    readme, warnings = build_report(results, out=out, gpu=gpu)
    assert readme == out / "README.md"
    return readme.read_text(), warnings


# ---------------------------------------------------------------------------------------------------- tests
def test_hand_checked_errors(tmp_path: Path) -> None:
    """Two runs with round numbers: every error cell is checked by hand."""
    comps = {"weights": 10 * GIB, "activations": 1 * GIB, "cuda_context": GIB // 2, "allocator_slack": GIB // 2}
    # predicted allocated 11 GiB, reserved 11.5 GiB, device 12 GiB
    measured = {"torch_max_allocated_bytes": 10 * GIB,            # (11 - 10) / 10 = +10.0 %
                "torch_max_reserved_bytes": 12 * GIB + GIB // 2,  # (11.5 - 12.5) / 12.5 = -8.0 %
                "nvml_baseline_bytes": 1 * GIB, "nvml_peak_used_bytes": 16 * GIB,  # above baseline: (12 - 16) / 16 = -25.0 %
                "tokens_per_s": 1000.0}
    traced = {"components": {}, "peak_bytes": 10 * GIB + GIB // 10 * 2, "phase": "backward", "seconds": 1.0}
    r1 = make_record("llama-2-7b", _method("lora"), _train(1, 512, False), components=comps, measured=measured,
                     traced=traced, fits=True)
    comps2 = {"weights": 9 * GIB}
    measured2 = {"torch_max_allocated_bytes": 12 * GIB, "tokens_per_s": 500.0}  # (9 - 12) / 12 = -25.0 %
    r2 = make_record("llama-2-7b", _method("full"), _train(1, 512, False), components=comps2, measured=measured2,
                     fits=True)
    text, warnings = build(write(tmp_path / "res", [r1, r2]), tmp_path / "out")
    assert warnings == []
    row = next(line for line in text.splitlines() if line.startswith("| llama-2-7b | lora"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[7:] == ["11.000", "10.000", "+10.0%", "11.500", "12.500", "-8.0%", "12.000", "16.000", "-25.0%",
                         "10.200", "+2.0%"]  # traced: 10.2 GiB vs 10 GiB measured
    full_row = next(line for line in text.splitlines() if line.startswith("| llama-2-7b | full"))
    assert [c.strip() for c in full_row.strip("|").split("|")][7:10] == ["9.000", "12.000", "-25.0%"]
    assert "allocated pred (GiB)" in text
    # summary: allocated |err| of lora 10 %, full 25 %; overall median 17.5 %, max 25 %
    summary = next(line for line in text.splitlines() if line.startswith("| **all**"))
    assert [c.strip() for c in summary.strip("|").split("|")][1:4] == ["2", "17.5%", "25.0%"]


def test_every_table_present_gpu_sweep(tmp_path: Path) -> None:
    text, warnings = build(write(tmp_path / "gpu-validate", gpu_sweep_records()), tmp_path / "out")
    assert warnings == []
    for heading in ("# lorabench report: gpu-validate", "## Runs", "## Predicted vs measured", "### Error summary per method",
                    "### Planner verdict vs observed (fit / OOM)", "### Figures", "### QLoRA vs LoRA (qlora / lora)",
                    "### lorabench vs bitsandbytes QLoRA (qlora / qlora[bnb])", "## Decision tables"):
        assert heading in text, heading
    assert "NVIDIA H100 80GB HBM3" in text and "aaaaaaaaaaaa" in text
    # status counts: 168 runs; 1 failed; full 7B oom where the planner predicted no fit, plus the missed OOM
    assert re.search(r"\| failed +\| 1 +\|", text) and re.search(r"\| \*\*total\*\* +\| 168 +\|", text)
    assert "missed OOM (planner said it fits, the run ran out of memory): llama-2-7b lora b=4 s=2,048 ckpt=off bf16" in text
    for png in ("scatter.png", "breakdown.png", "pareto.png"):
        assert f"]({png})" in text and (tmp_path / "out" / png).stat().st_size > 10_000
    # bnb runs are 0.8x slower in the fixture: lorabench/bnb tokens/s ratio 1.25x everywhere
    bnb = text.split("lorabench vs bitsandbytes QLoRA")[1].split("##")[0]
    header, *rows = [cells(l) for l in bnb.splitlines() if l.startswith("|") and not l.startswith("|--")]
    ratio = header.index("tokens/s ratio")
    # 3 models x 2 b x 2 s x 2 ckpt, except the missed-OOM lora run does not matter here
    assert len(rows) == 24 and {r[ratio] for r in rows} == {"1.25x"}


def test_confusion_counts(tmp_path: Path) -> None:
    from lorabench.records import to_frame
    from lorabench.report.frame import prepare
    from lorabench.report.tables import confusion_table

    recs = [make_record("m", _method("lora"), _train(b, 512, False), status=st, fits=f,
                        components={"weights": GIB}, measured={"torch_max_allocated_bytes": GIB} if st == "ok" else {})
            for b, (st, f) in enumerate([("ok", True), ("ok", True), ("oom", True), ("oom", False), ("ok", False),
                                         ("timeout", None)], start=1)]
    table, notes = confusion_table(prepare(to_frame(recs)))
    lines = table.splitlines()
    assert [c.strip() for c in lines[2].strip("|").split("|")] == ["planner: fits", "2", "1", "0", "3"]
    assert [c.strip() for c in lines[3].strip("|").split("|")] == ["planner: does not fit", "1", "1", "0", "2"]
    assert [c.strip() for c in lines[4].strip("|").split("|")] == ["planner: no verdict", "0", "0", "1", "1"]
    only_ok = prepare(to_frame(recs[:2]))
    assert len(confusion_table(only_ok)[0].splitlines()) == 3  # header, rule, one verdict row
    assert len(notes) == 2 and notes[0].startswith("missed OOM") and notes[1].startswith("over-cautious")


def test_cpu_sweep_components_and_mib_units(tmp_path: Path) -> None:
    text, _ = build(write(tmp_path / "cpu-smoke", cpu_sweep_records()), tmp_path / "out")
    assert "### Per-component errors" in text and "allocated pred (MiB)" in text
    assert "No reserved or device measurements" in text
    comp_rows = [l for l in text.split("### Per-component errors")[1].split("###")[0].splitlines()
                 if l.startswith("| tiny-llama")]
    assert len(comp_rows) == 24 and all(re.search(r"\| tracker +\|", l) for l in comp_rows)
    # lora stores no quantized weights: both sides agree on 0; qlora's quantized weights are exact
    lora = cells(next(l for l in comp_rows if l.startswith("| tiny-llama | lora")))
    assert lora[5:10] == ["bf16", "tracker", "2.10 (0.0%)", "0.13 (0.0%)", "0"]  # 1.1M x 2 B frozen; no NF4
    qlora = cells(next(l for l in comp_rows if l.startswith("| tiny-llama | qlora")))
    assert qlora[9] == "0.44 (0.0%)"  # 1.1M * 0.8 * 0.52 bytes = 0.44 MiB of NF4 storage, predicted exactly
    assert "## Decision tables" in text


def test_report_is_deterministic(tmp_path: Path) -> None:
    records = gpu_sweep_records()[::7] + cpu_sweep_records()[::3]
    res = write(tmp_path / "mixed", records)
    build(res, tmp_path / "a")
    build(res, tmp_path / "b")
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "README.md" in files_a and sum(n.endswith(".png") for n in files_a) >= 4
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_mixed_devices_reported_separately(tmp_path: Path) -> None:
    text, warnings = build(write(tmp_path / "mixed", gpu_sweep_records()[:20] + cpu_sweep_records()),
                           tmp_path / "out")
    assert any(w.startswith("records from 2 devices: AMD EPYC (24 runs), NVIDIA H100 80GB HBM3 (20 runs)")
               and w.endswith("reported separately") for w in warnings)
    assert "## Warnings" in text
    assert "## Predicted vs measured on AMD EPYC" in text and "## Predicted vs measured on NVIDIA H100 80GB HBM3" in text
    assert "](scatter-amd-epyc.png)" in text and "](scatter-nvidia-h100-80gb-hbm3.png)" in text


def test_torn_record_is_reported_not_fatal(tmp_path: Path) -> None:
    res = write(tmp_path / "res", cpu_sweep_records()[:3])
    with (res / "records.jsonl").open("a") as fh:
        fh.write(json.dumps(cpu_sweep_records()[3])[:57])  # a crash mid-write
    text, warnings = build(res, tmp_path / "out")
    assert warnings == ["records.jsonl line 4: torn last line (a write was cut off); skipped"]
    assert "- records.jsonl line 4: torn last line" in text
    assert re.search(r"\| \*\*total\*\* +\| 3 +\|", text)


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("no-file", "holds no records.jsonl"),
    ("empty", "no valid run records"),
    ("garbage", "2 invalid lines skipped"),
])
def test_bad_results_folder_is_one_line_exit_2(tmp_path: Path, setup: str, message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from lorabench.commands import report as report_cmd

    res = tmp_path / "res"
    if setup != "missing":
        res.mkdir()
    if setup == "empty":
        (res / "records.jsonl").write_text("")
    if setup == "garbage":
        (res / "records.jsonl").write_text("not json\n{\"schema\": 1}\n")
    args = argparse.Namespace(results_dir=str(res), out=str(tmp_path / "out"), gpu=None)
    with pytest.raises(UserError, match=message):
        report_cmd.run(args)
    from lorabench.cli import main

    assert main(["report", str(res), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_cli_default_out_and_prints_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from lorabench.cli import main

    res = write(tmp_path / "results" / "cpu-smoke", cpu_sweep_records()[:4])
    monkeypatch.chdir(tmp_path)
    assert main(["report", "results/cpu-smoke"]) == 0
    assert capsys.readouterr().out.strip() == str(Path("reports") / "cpu-smoke" / "README.md")
    assert (tmp_path / "reports" / "cpu-smoke" / "README.md").is_file()
    assert main(["report", str(res), "--out", "x", "--gpu", "h1000"]) == 2  # unknown GPU: one line, exit 2


def test_unknown_model_in_records_does_not_break_report(tmp_path: Path) -> None:
    rec = make_record("no-such-model", _method("lora"), _train(1, 128, False), components={"weights": MIB},
                      measured={"torch_max_allocated_bytes": MIB})
    text, _ = build(write(tmp_path / "res", [rec]), tmp_path / "out")
    assert "### no-such-model on h100-80gb" in text and "Cannot build the decision table" in text


@needs_planner
def test_decision_table_matches_planner(tmp_path: Path) -> None:
    from lorabench.catalog import load_gpu, load_model
    from lorabench.memory import planner
    from lorabench.methods import METHOD_NAMES, make_config
    from lorabench.records import load
    from lorabench.report.decide import DECISION_KEYS, decision_table
    from lorabench.specs import TrainSpec

    model, gpu = load_model("llama-2-7b"), load_gpu("h100")
    train = TrainSpec.from_record(_train(1, 512, False))
    records = [make_record("llama-2-7b", _method(m), _train(1, 512, False), components={"weights": GIB}, seed=seed,
                           measured={"torch_max_allocated_bytes": GIB, "tokens_per_s": speed})
               for m, speed, seed in (("lora", 1000.0, 0), ("lora", 3000.0, 1), ("qlora", 700.0, 0))]
    records.append(make_record("llama-2-7b", _method("lora", r=64), _train(1, 512, False),
                               measured={"tokens_per_s": 1.0}))  # non-default knobs: not counted
    records.append(make_record("llama-2-7b", _method("ia3"), _train(2, 512, False),
                               measured={"tokens_per_s": 1.0}))  # other train config: not counted
    df = load(write(tmp_path / "res", records))
    rows = decision_table(model, gpu, train, records_df=df)
    assert [r["method"] for r in rows] == list(METHOD_NAMES)
    for r in rows:
        assert tuple(r) == DECISION_KEYS
        pred = planner.predict(model, make_config(r["method"]), train, gpu)
        assert r["device_bytes"] == pred.device_bytes and r["fits"] == planner.fits(pred, gpu).fits
        assert r["max_micro_batch"] == planner.max_micro_batch(model, make_config(r["method"]), train, gpu)
        assert r["trainable_fraction"] == pytest.approx(pred.trainable_params / pred.total_params)
    speeds = {r["method"]: r["tokens_per_s"] for r in rows}
    assert speeds == {"full": None, "lora": 2000.0, "qlora": 700.0, "prefix": None, "adapters": None, "ia3": None}
    lora = next(r for r in rows if r["method"] == "lora")
    assert lora["trainable_params"] == 4_194_304  # PEFT's Llama-2-7B default LoRA count


@needs_planner
def test_decision_section_uses_records_gpu_or_flag(tmp_path: Path) -> None:
    recs = [make_record("llama-2-7b", _method("lora"), _train(1, 512, False), gpu="a100-40gb",
                        components={"weights": GIB}, measured={"torch_max_allocated_bytes": GIB, "tokens_per_s": 42.0})]
    res = write(tmp_path / "res", recs)
    text, _ = build(res, tmp_path / "o1")
    decisions = text.split("## Decision tables")[1]
    assert "### llama-2-7b on a100-40gb" in decisions and "| 42.0 " in decisions
    text, _ = build(res, tmp_path / "o2", gpu="h200")
    assert "### llama-2-7b on h200-141gb" in text and "not measured" in text.split("## Decision tables")[1]


def test_component_cells_and_error_format() -> None:
    from lorabench.report.frame import fmt_err
    from lorabench.report.tables import _component_cell

    nan = float("nan")
    assert _component_cell(0, 0, 10 * MIB, MIB) == "0"
    assert _component_cell(0, 64, 10 * MIB, MIB) == "0.00 (≈)"  # a 64-byte buffer is not a -100 % error
    assert _component_cell(2 * MIB, 0, 10 * MIB, MIB) == "0 (pred 2.00)"
    assert _component_cell(1.1 * MIB, MIB, 2 * MIB, MIB) == "1.00 (+10.0%)"
    assert _component_cell(MIB - 10, MIB, 2 * MIB, MIB) == "1.00 (0.0%)"  # tiny but exact-ish: keep the number
    assert _component_cell(nan, MIB, 2 * MIB, MIB) == "1.00 (-100.0%)"
    assert _component_cell(MIB, nan, 2 * MIB, MIB) == "—"
    assert [fmt_err(v) for v in (0.1, -0.08, -0.0004, 0.00049, nan)] == ["+10.0%", "-8.0%", "0.0%", "0.0%", "—"]


def test_report_of_runs_that_all_failed(tmp_path: Path) -> None:
    recs = []
    for b in (1, 2):
        r = make_record("llama-2-7b", _method("lora"), _train(b, 512, False), status="failed")
        r["predicted"], r["measured"], r["traced"] = None, None, None
        recs.append(r)
    text, warnings = build(write(tmp_path / "res", recs), tmp_path / "out")
    assert warnings == []
    assert "No run has a measured peak" in text and "planner: no verdict" in text
    assert not list((tmp_path / "out").glob("*.png"))


@needs_planner
def test_decision_table_accepts_a_train_per_method() -> None:
    from lorabench.catalog import load_gpu, load_model
    from lorabench.memory import planner
    from lorabench.methods import make_config
    from lorabench.report.decide import decision_table
    from lorabench.specs import TrainSpec

    model, gpu = load_model("llama-3.2-1b"), load_gpu("a100-40gb")
    trains = {m: TrainSpec.from_record(_train(1, 512, False, "bf16-mixed" if m == "full" else "bf16"))
              for m in ("full", "lora", "qlora", "prefix", "adapters", "ia3")}
    rows = decision_table(model, gpu, trains.__getitem__)
    full = next(r for r in rows if r["method"] == "full")
    assert full["device_bytes"] == planner.predict(model, make_config("full"), trains["full"], gpu).device_bytes
