"""The job subprocess entry (lorabench.runtime.job), the probes and the launcher, on tiny CPU runs."""

from __future__ import annotations

import json
import math
import sys

import pytest

from lorabench.catalog import load_model
from lorabench.methods import make_config
from lorabench.runtime import job, probe
from lorabench.runtime.launch import run_job_subprocess


def payload(method: str = "lora", cap: int | None = None, lr: float = 1e-3, **train: object) -> dict:
    """A job payload for tiny-llama on the CPU, as lorabench.sweep builds it."""
    spec = load_model("tiny-llama")
    train_cfg = {"micro_batch_size": 1, "seq_len": 32, "precision": "fp32", "gradient_checkpointing": False,
                 "attention": "sdpa", "optimizer": "adamw", "grad_accum_steps": 1, "num_gpus": 1,
                 "sharding": "none", "master_weights": False, **train}
    config = {"model": spec.name, "method": make_config(method).to_dict(), "train": train_cfg, "device": "cpu",
              "gpu": None, "memory_cap_bytes": cap, "warmup_steps": 1, "timed_steps": 2, "seed": 0}
    return {"config": config, "hf_config": dict(spec.hf_config), "lr": lr, "trace": False, "num_threads": None,
            "sampler_hz": 200.0, "gpu": None}


MEASURED_KEYS = ("tracker", "torch_max_allocated_bytes", "torch_max_reserved_bytes", "nvml_peak_used_bytes",
                 "nvml_baseline_bytes", "nvml_process_peak_bytes", "peak_rss_bytes", "step_time_s_median",
                 "step_time_s_p90", "tokens_per_s", "mfu", "loss_first", "loss_last", "nan_loss")


def test_percentile_and_step_stats() -> None:
    times = [0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert job.percentile(times, 90) == 0.9 and job.percentile(times, 50) == 0.5
    assert job.percentile([2.0], 90) == 2.0
    stats = job.step_stats([0.2, 0.1, 0.4], tokens_per_step=64)
    assert stats["step_time_s_median"] == 0.2 and stats["step_time_s_p90"] == 0.4
    assert stats["tokens_per_s"] == pytest.approx(320.0)


def test_cpu_tracker_covers_at_least_the_first_step_with_optimizer_state() -> None:
    assert job.untimed_steps(1, tracked=True) == 2 and job.untimed_steps(3, tracked=True) == 3
    assert job.untimed_steps(1, tracked=False) == 1 and job.untimed_steps(0, tracked=False) == 0


def test_flops_formula_matches_the_6n_rule_and_peft_discount() -> None:
    spec = load_model("llama-2-7b")
    n = probe.matmul_params(spec)
    # Llama-2-7B: 6,738,415,616 params, embeddings 32000*4096 are a lookup, the untied head is a matmul.
    assert n == 6_738_415_616 - 32000 * 4096
    attention = 12 * 32 * 32 * 128 * 512
    assert probe.training_flops_per_token(spec, True, 6_738_415_616, 512) == 6 * n + attention
    lora = probe.training_flops_per_token(spec, False, 4_194_304, 512)
    assert lora == 4 * n + 6 * 4_194_304 + attention
    assert lora / probe.training_flops_per_token(spec, True, 6_738_415_616, 512) == pytest.approx(2 / 3, rel=0.02)
    assert probe.model_flops_utilization(1e9, 1e3, 1e15) == pytest.approx(1e-3)


def test_device_resolution_without_torch() -> None:
    from lorabench.errors import UserError

    assert probe.resolve_device("cpu") == "cpu" and probe.resolve_device("cuda") == "cuda"
    assert probe.resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(UserError, match="device 'tpu'"):
        probe.resolve_device("tpu")
    gpu = probe.detect_gpu()
    assert gpu is None if probe.resolve_device("auto") == "cpu" else gpu is None or gpu.memory_bytes > 0


def test_nvml_sampler_degrades_without_a_driver() -> None:
    reading = probe.NvmlSampler(hz=200).start().stop()
    if reading.available:  # a GPU machine: the sampler ran at a useful rate
        assert reading.samples >= 1 and reading.baseline_bytes is not None and reading.peak_used_bytes >= 0
    else:
        assert reading.peak_used_bytes is None and reading.error
    with pytest.raises(ValueError):
        probe.NvmlSampler(hz=0)


def test_run_payload_measures_a_tiny_cpu_run() -> None:
    result = job.run_payload(payload("lora"))
    assert result["status"] == "ok", result["error"]
    measured = result["measured"]
    assert all(key in measured for key in MEASURED_KEYS)
    tracker = measured["tracker"]
    assert tracker["peak_bytes"] == sum(tracker["components"].values()) > 0
    assert tracker["components"]["weights_trainable"] > 0 and tracker["components"]["optimizer"] > 0
    assert len(measured["step_times_s"]) == 2 and measured["tokens_per_s"] > 0
    assert measured["step_time_s_p90"] >= measured["step_time_s_median"] > 0
    assert math.isfinite(measured["loss_first"]) and measured["nan_loss"] is False
    assert measured["peak_rss_bytes"] > measured["rss_before_model_bytes"] > 0
    assert measured["torch_max_allocated_bytes"] is None and measured["mfu"] is None
    assert result["env"]["torch"] and result["env"]["git_commit"]


def test_trace_true_records_the_fake_tensor_peak_beside_the_real_one() -> None:
    p = payload("qlora", precision="bf16", gradient_checkpointing=True)
    p["trace"] = True
    result = job.run_payload(p)
    assert result["status"] == "ok", result["error"]
    traced, tracker = result["traced"], result["measured"]["tracker"]
    assert set(traced) >= {"components", "peak_bytes", "phase", "seconds"}
    assert traced["peak_bytes"] == tracker["peak_bytes"] and traced["components"] == tracker["components"]


def test_cpu_cap_stops_inside_the_dispatch_mode_with_status_oom() -> None:
    free = job.run_payload(payload("lora"))["measured"]["tracker"]["peak_bytes"]
    cap = free // 2
    result = job.run_payload(payload("lora", cap=cap))
    assert result["status"] == "oom", result["error"]
    assert "memory_cap_bytes" in result["error"]
    # Exact: the op that crossed the cap is the last one counted.
    assert cap < result["measured"]["tracker"]["peak_bytes"] <= free


def test_diverging_loss_is_status_nan() -> None:
    result = job.run_payload(payload("full", lr=1e30, optimizer="sgd"))
    assert result["status"] == "nan", result
    assert result["measured"]["nan_loss"] is True


def test_bad_payload_is_status_failed_not_an_exception() -> None:
    bad = payload("lora")
    bad["hf_config"] = {**bad["hf_config"], "hidden_act": "no_such_activation"}
    result = job.run_payload(bad)
    assert result["status"] == "failed" and "no_such_activation" in result["error"]


def test_subprocess_launcher_kills_a_job_past_its_time_limit(tmp_path) -> None:
    outcome = run_job_subprocess(payload("lora"), timeout_s=1.0, log_dir=tmp_path)
    assert outcome.status == "timeout" and outcome.wall_s < 10 and "job_timeout_s=1" in outcome.error


def test_job_cli_accepts_inline_json(tmp_path, monkeypatch) -> None:
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["job"])
    monkeypatch.setattr(job, "watch_parent", lambda: None)  # never arm the orphan watchdog inside pytest
    assert job.main(["--config-json", json.dumps(payload("full")), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["status"] == "ok"


@pytest.mark.gpu
def test_gpu_run_reports_allocator_and_nvml_peaks() -> None:
    p = payload("lora", precision="bf16")
    p["config"]["device"] = "cuda"
    p["gpu"] = {"name": "h100-80gb", "bf16_flops_per_s": 989e12}
    result = job.run_payload(p)
    assert result["status"] == "ok", result["error"]
    m = result["measured"]
    assert m["torch_max_reserved_bytes"] >= m["torch_max_allocated_bytes"] > 0
    assert m["tracker"] is None and 0 < m["mfu"] < 1
    if m["nvml"]["available"]:
        assert m["nvml_peak_used_bytes"] >= m["torch_max_reserved_bytes"] and m["nvml"]["achieved_hz"] >= 50
