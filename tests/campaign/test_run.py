"""A short campaign dry run through the real code path (job server, clock, records, copy-out, resume) on the CPU."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from lorabench import records
from lorabench.campaign.__main__ import main

SUMMARY = re.compile(r"^campaign: (\d+) ok, (\d+) oom, (\d+) failed, overhead median ([\d.]+|-) s/job, elapsed (\d+) s$")
#: The dry preset cut to 16 validate jobs (tiny-llama, lora and ia3 x 8 shapes) and one probe cap between the
#: planner's levels of tiny-llama lora mbs=1 seq=32 with (0.44 MB) and without (0.56 MB) checkpointing; the perf
#: stage is left out (its minimum time is never left) to keep this test short.
SHORT = ["campaign.models=[tiny-llama]", "campaign.methods=[lora,ia3]", "campaign.methods_by_model={}",
         "campaign.micro_batches=[1,2]", "campaign.seq_lens=[32,64]", "campaign.probe_caps_bytes=[500000]",
         "campaign.probe_grid.models=[tiny-llama]", "campaign.probe_grid.methods=[lora]",
         "campaign.probe_grid.micro_batches=[1]", "campaign.probe_grid.seq_lens=[32]",
         "campaign.perf_min_s=100000", "campaign.extra_jobs=[]"]


def run(tmp: Path, capsys: pytest.CaptureFixture[str], budget_s: float, *extra: str) -> tuple[str, re.Match]:
    argv = ["--preset", "gpu-campaign-dry", "--results", str(tmp / "results"), "--out", str(tmp / "out"),
            "--budget-s", str(budget_s), *[f"--set={o}" for o in [*SHORT, *extra]]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    match = SUMMARY.match(last)
    assert match, last
    return out, match


def test_dry_campaign_records_copies_out_resumes_and_prints_the_summary_last(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    t0 = time.time()
    out, match = run(tmp_path, capsys, 600)
    assert "perf: left for the next call" in out and "jobs left" not in out
    assert match.group(1, 2, 3) == ("17", "1", "0")  # 16 validate + the probe below its cap ok, the one above oom
    assert float(match.group(4)) < 5 and int(match.group(5)) <= time.time() - t0 + 1
    for sweep in ("gpu-validate", "gpu-probes"):
        here, _ = records.read_records(tmp_path / "results" / sweep / "records.jsonl")
        copied, _ = records.read_records(tmp_path / "out" / f"{sweep}.records.jsonl")
        assert here == copied  # each record copied out at once
    validate, _ = records.read_records(tmp_path / "results" / "gpu-validate" / "records.jsonl")
    assert [r["config"]["method"]["method"] for r in validate[:2]] == ["lora", "ia3"]
    for r in validate:
        m = r["measured"]
        assert r["status"] == "ok" and len(m["step_times_s"]) == 5 and m["tokens_per_s"] > 0
        assert m["job_overhead_s"] == pytest.approx(m["job_wall_s"] - m["build_s"] - m["steps_s"] - m["trace_s"])
    probes, _ = records.read_records(tmp_path / "results" / "gpu-probes" / "records.jsonl")
    assert sorted((r["predicted"]["fits"], r["status"]) for r in probes) == [(False, "oom"), (True, "ok")]
    # A second call skips everything recorded; a call without time left starts nothing and says so.
    _, match = run(tmp_path, capsys, 600)
    assert match.group(1, 2, 3) == ("0", "0", "0")
    out, match = run(tmp_path / "fresh", capsys, 1)
    assert match.group(1, 2, 3) == ("0", "0", "0") and "validate: 16 jobs left for the next call" in out
