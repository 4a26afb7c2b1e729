"""Tests of lorabench.records: run ids, atomic appends, torn lines, resume ids, the flat frame, env.

The records here are TEST FIXTURES built in this file (schema-1, made-up numbers).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lorabench import records
from lorabench.errors import UserError
from lorabench.records import append_record, completed_ids, load, read_records, run_id

REPO = Path(__file__).resolve().parents[2]


def fixture_record(seed: int = 0, status: str = "ok", **measured: Any) -> dict[str, Any]:
    config = {"model": "tiny-llama",
              "method": {"method": "lora", "adapter_dtype": "fp32", "r": 8, "lora_alpha": 8, "lora_dropout": 0.0,
                         "target_modules": ["q_proj", "v_proj"], "use_rslora": False},
              "train": {"micro_batch_size": 2, "seq_len": 64, "precision": "fp32", "gradient_checkpointing": False,
                        "attention": "sdpa", "optimizer": "adamw", "grad_accum_steps": 1, "num_gpus": 1,
                        "sharding": "none", "master_weights": False},
              "device": "cpu", "gpu": None, "memory_cap_bytes": None, "warmup_steps": 1, "timed_steps": 2,
              "seed": seed}
    meas = {"tracker": {"components": {"weights_frozen": 100, "activations": 50}, "peak_bytes": 150, "phase": "backward"},
            "torch_max_allocated_bytes": None, "tokens_per_s": 1000.0 + seed, "loss_first": 10.0, "loss_last": 9.5,
            "nan_loss": False}
    meas.update(measured)
    return {"schema": 1, "run_id": run_id(config), "sweep": "fixture", "status": status, "config": config,
            "predicted": {"components": {"weights": 100, "activations": 40}, "peak_allocated_bytes": 140},
            "traced": None, "measured": meas, "error": None, "env": {"device_name": "cpu"},
            "timestamp": "2026-01-01T00:00:00Z"}


def test_run_id_is_sha1_of_canonical_json() -> None:
    config = {"b": 1, "a": [1, 2], "c": {"y": None, "x": "é"}}
    expected = hashlib.sha1(b'{"a":[1,2],"b":1,"c":{"x":"\\u00e9","y":null}}').hexdigest()[:16]
    assert run_id(config) == expected
    assert run_id(dict(reversed(list(config.items())))) == expected  # key order does not matter
    assert run_id({**config, "b": 2}) != expected
    assert len(expected) == 16 and int(expected, 16) >= 0


def test_append_writes_one_line_each_and_creates_folders(tmp_path: Path) -> None:
    path = tmp_path / "results" / "sweep" / "records.jsonl"
    for seed in range(3):
        append_record(path, fixture_record(seed))
    data = path.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 3
    got, warnings = read_records(path)
    assert warnings == [] and [r["config"]["seed"] for r in got] == [0, 1, 2]
    assert got[0] == json.loads(json.dumps(fixture_record(0)))


@pytest.mark.parametrize("mutate, reason", [
    (lambda r: r.pop("env"), "missing keys env"),
    (lambda r: r.pop("measured"), "missing keys measured"),
    (lambda r: r.update(status="crashed"), "status 'crashed'"),
    (lambda r: r.update(run_id="0" * 16), "is not the hash of its config"),
    (lambda r: r.update(schema=2), "schema 2"),
])
def test_append_refuses_invalid_records(tmp_path: Path, mutate: Any, reason: str) -> None:
    record = fixture_record()
    mutate(record)
    with pytest.raises(ValueError, match=reason):
        append_record(tmp_path / "r.jsonl", record)
    assert not (tmp_path / "r.jsonl").exists()


def test_nan_loss_is_written_as_null(tmp_path: Path) -> None:
    append_record(tmp_path / "r.jsonl", fixture_record(status="nan", loss_last=math.nan, nan_loss=True))
    line = (tmp_path / "r.jsonl").read_text()
    assert "NaN" not in line
    assert json.loads(line)["measured"]["loss_last"] is None


def test_torn_last_line_is_skipped_and_next_append_starts_a_new_line(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    append_record(path, fixture_record(0))
    append_record(path, fixture_record(1))
    with path.open("a") as fh:  # a writer killed mid-line
        fh.write(json.dumps(fixture_record(2))[:80])
    got, warnings = read_records(path)
    assert [r["config"]["seed"] for r in got] == [0, 1]
    assert warnings == ["records.jsonl line 3: torn last line (a write was cut off); skipped"]
    append_record(path, fixture_record(3))
    got, warnings = read_records(path)
    assert [r["config"]["seed"] for r in got] == [0, 1, 3]
    assert warnings == ["records.jsonl line 3: invalid JSON (JSONDecodeError); skipped"]


def test_invalid_lines_anywhere_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    good = json.dumps(fixture_record(0))
    bad_id = dict(fixture_record(1), run_id="f" * 16)
    path.write_bytes(b"\n".join([b"[1, 2]", good.encode(), b"\xff\xfe", json.dumps(bad_id).encode(), b"", good.encode()])
                     + b"\n")
    got, warnings = read_records(path)
    assert len(got) == 2
    assert warnings == [
        "records.jsonl line 1: invalid record (not a JSON object (list)); skipped",
        "records.jsonl line 3: invalid JSON (UnicodeDecodeError); skipped",
        "records.jsonl line 4: invalid record (run_id 'ffffffffffffffff' is not the hash of its config); skipped",
    ]


def test_read_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no run records at"):
        read_records(tmp_path / "nothing")


def test_completed_ids_for_resume(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    assert completed_ids(path) == set()  # first run of a sweep: nothing to skip
    ok, oom, failed = fixture_record(0), fixture_record(1, status="oom"), fixture_record(2, status="failed")
    for r in (ok, oom, failed):
        append_record(path, r)
    assert completed_ids(path) == {ok["run_id"]}
    assert completed_ids(tmp_path, statuses=("ok", "oom")) == {ok["run_id"], oom["run_id"]}


def test_load_flat_columns_one_row_per_run(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    append_record(path, fixture_record(0, status="failed"))
    append_record(path, fixture_record(0))  # the retry of the same config supersedes the failure
    append_record(path, fixture_record(1))
    df = load(tmp_path)  # a folder works as well as the file
    assert len(df) == 2 and list(df["status"]) == ["ok", "ok"]
    for column in ("config.model", "config.method.r", "config.train.seq_len", "predicted.components.weights",
                   "predicted.peak_allocated_bytes", "measured.tokens_per_s", "measured.tracker.peak_bytes",
                   "measured.tracker.components.activations", "env.device_name"):
        assert column in df.columns, column
    assert list(df["measured.tokens_per_s"]) == [1000.0, 1001.0]
    assert df["config.method.target_modules"].iloc[0] == ["q_proj", "v_proj"]
    assert df.attrs["warnings"] == [f"run {fixture_record(0)['run_id']} recorded 2 times; the last record is used"]
    assert len(load(path)) == 2


def _append_many(args: tuple[str, int]) -> None:
    path, worker = args
    for i in range(25):
        append_record(path, fixture_record(worker * 1000 + i))


def test_concurrent_appends_never_interleave(tmp_path: Path) -> None:
    path = str(tmp_path / "records.jsonl")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_append_many, [(path, w) for w in range(4)])
    got, warnings = read_records(path)
    assert warnings == [] and len(got) == 100 and len({r["run_id"] for r in got}) == 100


def test_environment_fields_and_no_torch_import() -> None:
    code = ("import sys, json; from lorabench.records import environment; env = environment('cpu'); "
            "print(json.dumps({'env': env, 'torch': 'torch' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=60)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    env = result["env"]
    assert result["torch"] is False  # a CPU run without torch loaded must not import it
    assert set(env) == {"device_name", "driver", "cuda", "torch", "transformers", "bitsandbytes", "peft", "python",
                        "platform", "git_commit", "git_dirty", "load_average"}
    assert env["device_name"] and env["python"].count(".") == 2
    assert env["git_commit"] == "unknown" or len(env["git_commit"]) == 40
    assert isinstance(env["git_dirty"], bool)
    assert len(env["load_average"]) == 3
    from importlib.metadata import version

    assert env["transformers"] == version("transformers")


def test_git_dirty_ignores_results_and_reports() -> None:
    commit, dirty = records.git_state()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    outside = [l for l in status.splitlines() if not l[3:].startswith(("results/", "reports/"))]
    if commit != "unknown":
        assert dirty == bool(outside)
