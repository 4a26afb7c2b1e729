"""The fork-per-job server (lorabench.runtime.jobserver): same results as the subprocess job, isolation kept."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from lorabench.runtime import jobserver
from tests.runtime.test_job import MEASURED_KEYS, payload


@pytest.fixture(scope="module")
def server() -> jobserver.JobServer:
    srv = jobserver.JobServer()
    srv.start()
    return srv


def test_a_forked_job_measures_like_the_subprocess_job_and_the_parent_never_touches_cuda(
        server: jobserver.JobServer, tmp_path: Path) -> None:  # fmt: skip
    outcome = server.run(payload("lora"), timeout_s=120, log_dir=tmp_path)
    assert outcome.status == "ok", outcome.error
    m = outcome.measured
    assert set(MEASURED_KEYS) <= set(m) and m["tracker"]["peak_bytes"] > 0 and m["tokens_per_s"] > 0
    assert len(m["step_times_s"]) == 2 and m["build_s"] > 0 and m["steps_s"] >= sum(m["step_times_s"])
    assert outcome.wall_s > m["build_s"] + m["steps_s"] and outcome.env["python"]
    assert outcome.returncode == 0 and not torch.cuda.is_initialized() and not jobserver.cuda_driver_loaded()
    jobserver.assert_no_cuda()  # what run() checks before every fork


def die_by_sigkill(payload: dict, env_path: Path) -> None:
    """A job runner that dies by a signal (the child has no chance to write a result)."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_timeout_oom_and_crash_stay_in_their_child(server: jobserver.JobServer, tmp_path: Path) -> None:
    slow = payload("full", seq_len=256)
    slow["config"]["timed_steps"] = 500
    timeout = server.run(slow, timeout_s=0.5, log_dir=tmp_path)
    assert timeout.status == "timeout" and "job_timeout_s=0.5" in timeout.error and timeout.wall_s < 5
    oom = server.run(payload("lora", cap=400_000), timeout_s=120, log_dir=tmp_path)
    assert oom.status == "oom" and "memory_cap_bytes" in oom.error
    crash = server.run(payload("lora"), timeout_s=120, log_dir=tmp_path, runner=die_by_sigkill)
    assert crash.status == "failed" and "SIGKILL" in crash.error and crash.measured is None
    after = server.run(payload("lora"), timeout_s=120, log_dir=tmp_path)  # nothing leaked into the next job
    assert after.status == "ok" and after.measured["tracker"]["peak_bytes"] > 400_000


def test_a_job_forked_from_a_process_that_touched_cuda_refuses_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(jobserver.CudaInParent, match="own context"):
        jobserver.assert_no_cuda()


def test_children_do_not_inherit_the_callers_thread_pools(server: jobserver.JobServer, tmp_path: Path) -> None:
    """This process has run CPU kernels on several threads (a fork of it could hang in its first parallel
    region); the job's child is forked from the clean helper instead and runs at once."""
    torch.set_num_threads(2)
    torch.randn(512, 512) @ torch.randn(512, 512)
    job_payload = payload("lora")
    job_payload["num_threads"] = 2
    assert server.run(job_payload, timeout_s=60, log_dir=tmp_path).status == "ok"
