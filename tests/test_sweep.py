"""The sweep runner end to end: real Hydra multiruns of tiny CPU training jobs, each in its own subprocess."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lorabench import records
from lorabench.methods import METHOD_NAMES

ROOT = Path(__file__).resolve().parent.parent
#: Smallest honest job: tiny-llama, one warmup + one timed step, 32 tokens, fp32 on the CPU.
TINY = ["device=cpu", "train.seq_len=32", "train.micro_batch_size=1", "train.precision=fp32",
        "train.warmup_steps=1", "train.timed_steps=1", "sweep_name=t", "num_threads=1"]
RECORD_KEYS = set(records.REQUIRED_KEYS)


def sweep_cmd(tmp: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "lorabench.sweep", "-m", *TINY, f"results_dir={tmp}",
            f"hydra.sweep.dir={tmp}/hydra", *overrides]


def run_sweep(tmp: Path, *overrides: str, timeout: float = 240) -> tuple[str, list[dict]]:
    out = subprocess.run(sweep_cmd(tmp, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    path = tmp / "t" / "records.jsonl"
    recs, warnings = records.read_records(path) if path.exists() else ([], [])
    assert warnings == []
    return out.stdout, recs


@pytest.mark.slow
def test_two_job_multirun_writes_two_ok_records(tmp_path: Path) -> None:
    stdout, recs = run_sweep(tmp_path, "method=lora,ia3")
    assert [r["status"] for r in recs] == ["ok", "ok"], stdout
    assert [r["config"]["method"]["method"] for r in recs] == ["lora", "ia3"]
    for r in recs:
        assert set(r) == RECORD_KEYS and records.validate(r) is None
        assert r["predicted"]["peak_allocated_bytes"] > 0 and r["predicted"]["fits"] is None
        assert r["measured"]["tracker"]["peak_bytes"] > 0 and r["measured"]["tokens_per_s"] > 0
        assert r["config"]["device"] == "cpu" and r["config"]["timed_steps"] == 1 and r["env"]["python"]
    assert "[1/2] ok" in stdout and "[2/2] ok" in stdout and "tok/s" in stdout
    # Hydra's own files stay out of the results folder.
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["records.jsonl"]


@pytest.mark.slow
def test_failures_timeouts_and_the_cpu_cap_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    # job_launcher=subprocess: job_timeout_s=2 kills a job while it is still importing transformers: timeout
    # (twice). (The fork launcher's timeouts are tested in tests/runtime/test_jobserver.py.)
    # hidden_act=bogus is fine for the planner but transformers cannot build the model: failed.
    # memory_cap_bytes=400000 is below the tensor peak (and the 500 kB of fp32 weights): oom.
    cap = 400000
    stdout, recs = run_sweep(tmp_path, "job_timeout_s=2,120", "model.hf_config.hidden_act=bogus,silu",
                             f"memory_cap_bytes={cap}", "job_launcher=subprocess")
    assert len(recs) == 4, stdout
    cases = {(r["config"]["model_hf_config_overrides"]["hidden_act"] if "model_hf_config_overrides" in r["config"]
              else "silu", r["status"]) for r in recs}
    assert cases == {("bogus", "timeout"), ("silu", "timeout"), ("bogus", "failed"), ("silu", "oom")}, stdout
    assert all("job_timeout_s=2" in r["error"] for r in recs if r["status"] == "timeout")
    failed = next(r for r in recs if r["status"] == "failed")
    assert "bogus" in failed["error"] and failed["predicted"]["peak_allocated_bytes"] > 0
    oom = next(r for r in recs if r["status"] == "oom")
    assert oom["config"]["memory_cap_bytes"] == cap and oom["predicted"]["fits"] is False
    assert oom["measured"]["tracker"]["peak_bytes"] > cap and "memory_cap_bytes" in oom["error"]
    # The time limit is not part of a run's identity: each timeout is an earlier attempt of a later run.
    assert len({r["run_id"] for r in recs}) == 2
    assert "[4/4] oom" in stdout and "[1/4] timeout" in stdout
    # Default resume retries everything not ok; resume_skip can also keep deterministic outcomes.
    stdout, again = run_sweep(tmp_path, "job_timeout_s=2,120", "model.hf_config.hidden_act=bogus,silu",
                              f"memory_cap_bytes={cap}", "resume_skip=[ok,oom,failed]", "job_launcher=subprocess")
    assert stdout.count("skip (recorded)") == 4 and again == recs, stdout


@pytest.mark.slow
def test_resume_after_sigkill_records_every_job_exactly_once(tmp_path: Path) -> None:
    methods = "lora,ia3"
    path = tmp_path / "t" / "records.jsonl"
    proc = subprocess.Popen(sweep_cmd(tmp_path, f"method={methods}"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while not (path.exists() and path.read_bytes().count(b"\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before a record landed"
        time.sleep(0.1)
    psutil = pytest.importorskip("psutil")
    jobs: list = []
    while not jobs and time.monotonic() < deadline:  # job 2's subprocess starts a moment after record 1
        jobs = [p for p in psutil.Process(proc.pid).children(recursive=True) if _is_job(p)]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole sweep's process group, mid-way through job 2
    proc.wait()
    first = records.read_records(path)[0]
    assert len(first) == 1 and first[0]["status"] == "ok"
    # Job 2 runs in its own session (out of reach of the killpg); it notices its parent died and exits.
    assert jobs, "no job subprocess was running at the kill"
    _, alive = psutil.wait_procs(jobs, timeout=10)
    assert not alive, "orphaned job subprocess still running"

    stdout, recs = run_sweep(tmp_path, f"method={methods}")
    assert stdout.count("skip (recorded)") == 1, stdout
    ids = [r["run_id"] for r in recs]
    assert len(ids) == len(set(ids)) == 2
    assert sorted(r["config"]["method"]["method"] for r in recs) == sorted(methods.split(","))
    assert all(r["status"] == "ok" for r in recs)


def _is_job(process) -> bool:  # type: ignore[no-untyped-def]
    """A job process under the sweep: a fresh ``lorabench.runtime.job``, or the job server's helper
    (``multiprocessing.forkserver``) and the children it forks."""
    try:
        cmdline = " ".join(process.cmdline())
        return "lorabench.runtime.job" in cmdline or "forkserver" in cmdline
    except Exception:  # it exited meanwhile
        return False


def test_lorabench_run_forwards_to_hydra(capsys: pytest.CaptureFixture[str]) -> None:
    from lorabench.cli import main

    assert main(["run", "--cfg", "job", "sweep=cpu-smoke"]) == 0
    printed = capsys.readouterr().out
    assert "sweep_name: cpu-smoke" in printed and "seq_len: 64" in printed


# ---------------------------------------------------------------------------------------------- accuracy
def _smoke_grid() -> list[list[str]]:
    """The cpu-smoke preset's own grid (hydra.sweeper.params), one override list per job."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        params = compose("config", overrides=["sweep=cpu-smoke"], return_hydra_config=True).hydra.sweeper.params
    keys = list(params)
    return [[f"{k}={v}" for k, v in zip(keys, combo)]
            for combo in itertools.product(*(str(params[k]).split(",") for k in keys))]


@pytest.mark.slow
def test_cpu_smoke_tracker_peak_within_5_percent_of_the_planner() -> None:
    """Every cpu-smoke job: the CPU-measured tensor peak vs predicted.peak_allocated_bytes, per method. The
    jobs run in-process through exactly the payload the sweep sends its job subprocess (one timed step)."""
    from lorabench.runtime.job import run_payload
    from lorabench.sweep import build_specs, job_payload, predicted_block, record_config

    rows, bad = [], set()
    grid = _smoke_grid()
    assert {o for job in grid for o in job if o.startswith("method=")} == {f"method={m}" for m in METHOD_NAMES}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        for overrides in grid:
            cfg = compose("config", overrides=["sweep=cpu-smoke", *overrides, "train.timed_steps=1"])
            specs = build_specs(cfg)
            config = record_config(cfg, specs, "cpu")
            predicted = predicted_block(specs, "cpu", None)["peak_allocated_bytes"]
            result = run_payload(job_payload(cfg, specs, config))
            assert result["status"] == "ok", (overrides, result["error"])
            measured = result["measured"]["tracker"]["peak_bytes"]
            error = (predicted - measured) / measured
            rows.append(f"{' '.join(overrides):75s} measured {measured:>8d} predicted {predicted:>8d} "
                        f"error {100 * error:+6.2f}%")
            if abs(error) > 0.05:
                bad.add(cfg.method.name)
    print("\n".join(rows))
    assert not bad, f"planner off by more than 5% for {sorted(bad)}:\n" + "\n".join(rows)


def test_bitsandbytes_on_the_cpu_with_rows_its_kernels_get_wrong_is_refused_before_running() -> None:
    """tiny-llama's down_proj reads rows of 176 (not a multiple of blocksize 64): refused on the CPU whatever
    the CPU model (bitsandbytes 0.50.2 mis-dequantizes them on AVX512 CPUs only), accepted on cuda."""
    from lorabench.errors import UserError
    from lorabench.quant.sizes import bnb_cpu_row_problem
    from lorabench.sweep import build_specs, check_job, runnable

    assert bnb_cpu_row_problem(192) is None and bnb_cpu_row_problem(128, 128) is None
    assert "rows of 176" in str(bnb_cpu_row_problem(176))
    bnb_knobs = ["method=qlora", "method.backend=bitsandbytes"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        with pytest.raises(UserError, match="rows of 176 .*mlp.down_proj.*method.backend=lorabench"):
            check_job(compose("config", overrides=["device=cpu", *bnb_knobs]))
        check_job(compose("config", overrides=["device=cpu", *bnb_knobs, "model.hf_config.intermediate_size=192"]))
        check_job(compose("config", overrides=["device=cpu", "method=qlora"]))
        bnb = build_specs(compose("config", overrides=bnb_knobs))
    assert "mlp.down_proj" in str(runnable(bnb, "cpu")) and runnable(bnb, "cuda") is None


def test_the_peft_stack_runs_for_real_and_records_its_stack(tmp_path: Path) -> None:
    """recipe=hf-qlora / hf-lora execute PEFT's modules (QLoRA over bitsandbytes NF4, loaded as transformers
    loads 4-bit) and record train.stack=peft; the measured peak is the planner's within 6% (a tiny model)."""
    stdout, recs = run_sweep(tmp_path, "model=tiny-gemma2", "recipe=hf-qlora,hf-lora", "train.attention=eager",
                             "train.precision=null", "train.seq_len=512")
    assert [r["status"] for r in recs] == ["ok", "ok"], stdout
    for r in recs:
        assert r["config"]["train"]["stack"] == "peft"
        measured, predicted = r["measured"]["tracker"]["peak_bytes"], r["predicted"]["peak_allocated_bytes"]
        assert abs(predicted - measured) / measured < 0.06, (r["config"]["method"]["method"], measured, predicted)
