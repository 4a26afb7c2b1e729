"""The GPU-accuracy regression guard and the calibration it relies on.

``test_committed_gpu_records_meet_the_accuracy_targets`` recomputes the planner's prediction for every committed
GPU record (results/*/records.jsonl, device cuda) with the committed calibration and asserts the campaign's targets
on the held-out half: median |predicted - measured| / measured <= 2 % and max <= 5 % on the NVML device peak, and
the fit/OOM verdict right on every probe. It skips while no GPU record is committed.

Every other test runs the same checking code (lorabench.calibrate) on records built HERE by
:func:`synthetic_gpu_records`: a TEST FIXTURE of invented numbers (sweep name ``test-fixture-synthetic``), never
written under results/ and never a measurement.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from lorabench import calibrate, records
from lorabench.cli import main as cli_main
from lorabench.memory import planner
from lorabench.methods import make_config
from lorabench.specs import OptimizerSpec, TrainSpec

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- the guard
def committed_gpu_records() -> list[dict[str, Any]]:
    """Every valid CUDA record of results/<sweep>/records.jsonl (scratch folders starting with _ excluded)."""
    paths = [p for p in sorted(ROOT.glob("results/*/records.jsonl")) if not p.parent.name.startswith("_")]
    return [r for r in calibrate.load_records(paths) if r["config"].get("device") == "cuda"]


def guard_failures(recs: list[dict[str, Any]]) -> list[str]:
    """Missed targets of the committed records, plus any GPU whose overheads were never fitted."""
    failures = []
    for gpu, result in calibrate.check(recs).items():
        if not (ROOT / "conf" / "calibration" / f"{gpu}.yaml").is_file():
            failures.append(f"{gpu}: GPU records committed but no conf/calibration/{gpu}.yaml "
                            "(run lorabench calibrate)")
        failures += result.failures()
    return failures


def test_committed_gpu_records_meet_the_accuracy_targets() -> None:
    recs = committed_gpu_records()
    if not any(calibrate.is_measured_gpu_run(r) or calibrate.is_probe(r) for r in recs):
        pytest.skip("no GPU records committed yet (the validation campaign needs a GPU)")
    failures = guard_failures(recs)
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------- TEST FIXTURE
FIXTURE_SWEEP = "test-fixture-synthetic"
GPU = "h100-80gb"


def fixture_config(model: str, method: str, mbs: int, seq: int, ckpt: bool, cap: int | None = None) -> dict[str, Any]:
    """A record ``config`` block as the sweep writes it (lorabench.sweep.record_config)."""

    train = TrainSpec(micro_batch_size=mbs, seq_len=seq, precision="bf16", gradient_checkpointing=ckpt,
                      optimizer=OptimizerSpec("adamw"))
    return {"model": model, "method": make_config(method, {}).to_dict(), "train": train.to_record(),
            "device": "cuda", "gpu": GPU, "memory_cap_bytes": cap, "warmup_steps": 3, "timed_steps": 10, "seed": 0}


def fixture_record(config: dict[str, Any], status: str, measured: dict[str, Any] | None) -> dict[str, Any]:
    return {"schema": 1, "run_id": records.run_id(config), "sweep": FIXTURE_SWEEP, "status": status,
            "config": config, "predicted": None, "traced": None, "measured": measured, "error": None,
            "env": {"device_name": "SYNTHETIC TEST FIXTURE (not a measurement)", "driver": None, "cuda": None,
                    "torch": "fixture", "git_commit": "f1x7ure0000000000000000000000000000000000",
                    "git_dirty": False},
            "timestamp": "2001-02-03T04:05:06+00:00"}


def synthetic_gpu_records(truth: Any, alloc_err: Callable[[int], float], seed: int = 0) -> list[dict[str, Any]]:
    """TEST FIXTURE: 48 invented uncapped 'runs' whose measured levels follow the planner's allocated prediction
    times (1 + alloc_err(i)), an allocator slack max(f a, m) (+-2 % noise) and a context (+-8 MiB noise) of
    ``truth``; plus 8 capped 'probes' whose statuses are what an exact planner implies."""
    rng = random.Random(seed)
    out = []
    grid = [(model, method, mbs, ckpt) for model in ("qwen2.5-0.5b", "llama-3.2-1b", "llama-2-7b")
            for method in ("lora", "qlora", "ia3", "prefix") for mbs in (1, 4) for ckpt in (False, True)]
    for i, (model, method, mbs, ckpt) in enumerate(grid):
        config = fixture_config(model, method, mbs, 512, ckpt)
        a = int(calibrate.predicted_levels(config, truth)["allocated"] * (1 + alloc_err(i)))
        r = a + int(truth.slack_bytes(a) * (1 + rng.uniform(-0.02, 0.02)))
        d = r + truth.cuda_context_bytes + rng.randint(-8 << 20, 8 << 20)
        out.append(fixture_record(config, "ok", {"torch_max_allocated_bytes": a, "torch_max_reserved_bytes": r,
                                                 "nvml_peak_used_bytes": d, "nvml_baseline_bytes": 1 << 29}))
    for model, method in (("llama-3.2-1b", "lora"), ("llama-3.2-1b", "full"), ("qwen2.5-0.5b", "qlora"),
                          ("llama-2-7b", "qlora")):
        levels = calibrate.predicted_levels(fixture_config(model, method, 4, 2048, True), truth)
        for cap, status in ((int(levels["allocated"] * 0.95), "oom"), (int(levels["reserved"] * 1.05), "ok")):
            out.append(fixture_record(fixture_config(model, method, 4, 2048, True, cap), status, None))
    return out


TRUTH = calibrate.Calibration(cuda_context_bytes=600 << 20, allocator_slack_fraction=0.03,
                              allocator_slack_min_bytes=48 << 20)


def small_errors(i: int) -> float:
    return ((i * 7919) % 11 - 5) / 1000  # within +-0.5 %


# ---------------------------------------------------------------------------------------------- tests
def test_fixture_records_are_valid_records_and_never_land_in_results() -> None:
    recs = synthetic_gpu_records(TRUTH, small_errors)
    assert all(records.validate(r) is None for r in recs)
    assert len({r["run_id"] for r in recs}) == len(recs) == 56
    assert all(r["sweep"] == FIXTURE_SWEEP for r in recs)
    assert not any(r["sweep"] == FIXTURE_SWEEP for r in calibrate.load_records(ROOT.glob("results/*/records.jsonl")))


def test_split_is_deterministic_and_about_half() -> None:
    ids = [records.run_id({"i": i}) for i in range(400)]
    halves = [calibrate.half(rid) for rid in ids]
    assert halves == [calibrate.half(rid) for rid in ids]
    assert 160 < halves.count("fit") < 240


def test_overhead_formula_replicates_the_planner_with_the_committed_calibration() -> None:
    committed = calibrate.Calibration.from_mapping(planner.calibration(GPU))
    for config in (fixture_config("llama-2-7b", "qlora", 4, 2048, False),
                   fixture_config("qwen2.5-0.5b", "full", 1, 512, True)):
        assert calibrate.predicted_levels(config, committed) == calibrate.predicted_levels(config, None)


@pytest.mark.parametrize("overrides", [["model=qwen2.5-0.5b", "method=qlora", "train.micro_batch_size=4"],
                                       ["model=llama-3.2-1b", "method=prefix", "train.gradient_checkpointing=true"],
                                       ["model=tiny-llama", "method=adapters", "model.hf_config.num_hidden_layers=3"]])
def test_record_config_rebuilds_the_runners_specs(overrides: list[str]) -> None:
    """The guard's config -> specs path predicts exactly what the sweep parent predicted for that job."""
    from hydra import compose, initialize_config_dir

    from lorabench.sweep import CONF_DIR, build_specs, record_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=["sweep=gpu-validate", "device=cuda", *overrides])
    specs = build_specs(cfg)
    config = record_config(cfg, specs, "cuda")
    pred = planner.predict(specs.model, specs.method, specs.train, specs.gpu)
    assert calibrate.predicted_levels(config, None) == {"allocated": pred.peak_allocated_bytes,
                                                         "reserved": pred.reserved_bytes, "device": pred.device_bytes}


def test_fit_recovers_the_fixture_overheads() -> None:
    recs = synthetic_gpu_records(TRUTH, small_errors)
    fit_runs = [r for r in recs if calibrate.is_measured_gpu_run(r) and calibrate.half(r["run_id"]) == "fit"]
    cal = calibrate.fit(fit_runs)
    assert abs(cal.cuda_context_bytes - TRUTH.cuda_context_bytes) < 8 << 20
    assert abs(cal.allocator_slack_fraction - TRUTH.allocator_slack_fraction) < 0.002
    for record in recs:  # the fitted slack model predicts every run's slack like the truth does
        a = record["measured"]["torch_max_allocated_bytes"] if record["measured"] else None
        if a:
            assert abs(cal.slack_bytes(a) - TRUTH.slack_bytes(a)) <= 0.03 * TRUTH.slack_bytes(a) + (8 << 20)


def test_floor_fit_finds_a_floor_only_when_runs_sit_on_it() -> None:
    proportional = [(a, int(0.05 * a)) for a in (1 << 30, 2 << 30, 4 << 30, 8 << 30)]
    assert calibrate.l1_floor(proportional, 0.05) == 0
    floored = [(a, max(int(0.05 * a), 64 << 20)) for a in (1 << 28, 1 << 29, 1 << 30, 4 << 30, 8 << 30)]
    assert calibrate.l1_floor(floored, 0.05) == 64 << 20


def test_check_passes_a_fixture_that_meets_the_targets() -> None:
    recs = synthetic_gpu_records(TRUTH, small_errors)
    result = calibrate.check(recs, TRUTH)[GPU]
    assert len(result.heldout) >= 15 and len(result.probes) == 8
    assert result.median_abs_rel_err < 0.01 and result.max_abs_rel_err < 0.02
    assert result.failures() == []


def test_check_fails_a_fixture_with_a_bad_prediction_and_a_wrong_verdict() -> None:
    recs = synthetic_gpu_records(TRUTH, lambda i: 0.12 if i % 3 == 0 else small_errors(i))
    probe = next(r for r in recs if r["config"]["memory_cap_bytes"] and r["status"] == "ok")
    recs[recs.index(probe)] = {**probe, "status": "oom"}  # the planner said it fits; it did not
    failures = calibrate.check(recs, TRUTH)[GPU].failures()
    assert any("max |err|" in f for f in failures), failures
    assert any("probe verdict wrong" in f and probe["run_id"] in f for f in failures), failures
    skewed = synthetic_gpu_records(TRUTH, lambda i: 0.04)  # every run 4 % off: median target missed
    assert any("median |err|" in f for f in calibrate.check(skewed, TRUTH)[GPU].failures())


def test_guard_uses_the_committed_calibration_and_fails_without_a_fitted_file() -> None:
    committed = calibrate.Calibration.from_mapping(planner.calibration(GPU))
    good = synthetic_gpu_records(committed, small_errors)
    assert calibrate.check(good)[GPU].failures() == []  # cal=None: planner.predict with conf/calibration
    has_fit = (ROOT / "conf" / "calibration" / f"{GPU}.yaml").is_file()
    assert any("no conf/calibration" in f for f in guard_failures(good)) != has_fit
    bad = synthetic_gpu_records(committed, lambda i: -0.10)
    assert calibrate.check(bad)[GPU].failures()


def test_calibrate_cli_writes_provenance_from_the_records(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "records.jsonl"
    for record in synthetic_gpu_records(TRUTH, small_errors):
        records.append_record(path, record)
    out = tmp_path / "cal.yaml"
    assert cli_main(["calibrate", "--records", str(path), "--out", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    cal = calibrate.Calibration.from_mapping(doc)
    assert abs(cal.cuda_context_bytes - TRUTH.cuda_context_bytes) < 8 << 20
    assert "2001-02-03" in doc["source"] and "f1x7ure00000" in doc["source"] and str(path) in doc["source"]
    assert doc["fit"]["records_dates"] == "2001-02-03" and doc["fit"]["runs_fit"] + doc["fit"]["runs_heldout"] == 48
    assert doc["fit"]["probe_verdicts_right"] == doc["fit"]["probes"] == 8
    residual = doc["fit"]["allocated_residual_bytes"]  # the fixture's allocated errors are within +-0.5 %
    assert residual["p25"] <= residual["median"] <= residual["p75"] and abs(residual["median"]) < 64 << 20
    assert "targets met" in capsys.readouterr().out


def test_calibrate_refuses_without_gpu_records(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "records.jsonl"
    cpu = fixture_record({**fixture_config("tiny-llama", "lora", 1, 32, False), "device": "cpu", "gpu": None}, "ok",
                         {"tracker": None})
    records.append_record(path, cpu)
    for argv in (["--records", str(path)], ["--records", str(tmp_path / "missing.jsonl")]):
        assert cli_main(["calibrate", *argv, "--out", str(tmp_path / "x.yaml")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lorabench calibrate: no GPU records") and "\n" not in err
    assert not (tmp_path / "x.yaml").exists()
