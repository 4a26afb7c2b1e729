"""plan/compare print and emit step time, tokens/s, MFU, time to train and cost; bad budget flags exit 2."""

from __future__ import annotations

import json

import pytest

from lorabench.catalog import load_gpu
from lorabench.cli import main


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_time_fields(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["plan", "--model", "7b", "--method", "qlora", "--gpu", "a6000", "--format", "json"], capsys)
    pred = json.loads(out)["prediction"]
    assert code == 0 and pred["step_time_s"] > 0 and 0 < pred["mfu"] < 1
    assert pred["tokens_per_s"] == pytest.approx(512 / pred["step_time_s"])
    assert "train_time_s" not in pred and pred["time_device"] == "rtx-a6000-48gb"
    code, out, _ = _run(["plan", "--model", "7b", "--method", "qlora", "--gpu", "a6000", "--format", "json",
                         "--dataset-tokens", "1e8", "--epochs", "3"], capsys)
    pred = json.loads(out)["prediction"]
    assert pred["train_time_s"] == pytest.approx(3e8 / pred["tokens_per_s"])
    assert pred["cost_usd"] == pytest.approx(pred["train_time_s"] / 3600 * load_gpu("a6000").usd_per_hour)
    code, out, _ = _run(["plan", "--model", "7b", "--method", "lora", "--gpu", "h100", "--format", "json",
                         "--tokens", "1e9", "--usd-per-hour", "2", "--gpus", "4"], capsys)
    pred = json.loads(out)["prediction"]
    assert pred["cost_usd"] == pytest.approx(pred["train_time_s"] / 3600 * 2 * 4)


def test_plan_table_has_time_columns_for_fitting_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["plan", "--model", "7b", "--method", "lora", "--tokens", "1e9"], capsys)
    assert code == 0 and "tokens/s" in out and "MFU" in out and "train time" in out and "cost" in out
    t4 = next(line for line in out.splitlines() if line.startswith("t4-16gb"))
    assert t4.split()[2] == "no" and "$" not in t4  # no time or cost for a config that does not fit


def test_compare_is_a_decision_table_with_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["compare", "--model", "7b", "--gpu", "l40s", "--tokens", "1e8"], capsys)
    assert code == 0 and "fits l40s-48gb" in out and "tokens/s" in out and "cost" in out
    assert "QLoRA vs LoRA (both on all-linear targets): memory -" in out and "step time +" in out
    assert "full fine-tuning vs LoRA" in out
    code, out, _ = _run(["compare", "--model", "7b", "--format", "json"], capsys)
    doc = json.loads(out)
    assert {m["method"]["method"] for m in doc["methods"]} == {"full", "lora", "qlora", "prefix", "adapters", "ia3"}
    assert all(m["prediction"]["step_time_s"] > 0 for m in doc["methods"])


@pytest.mark.parametrize("args, needle", [
    (["--tokens", "1e9", "--dataset-tokens", "1e8"], "both given"),
    (["--epochs", "2"], "--epochs needs --dataset-tokens"),
    (["--tokens", "-5"], "must be positive"),
    (["--usd-per-hour", "-1"], "must be >= 0"),
])
def test_bad_budget_flags_exit_2_in_one_line(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["plan", "--model", "7b", "--method", "lora", *args], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_explain_lists_time_per_op_class_with_sources(capsys: pytest.CaptureFixture[str]) -> None:
    from lorabench.commands.timing import CLASS_SOURCES
    from tests.test_sources import _anchors

    code, out, _ = _run(["plan", "--model", "7b", "--method", "qlora", "--gpu", "h100", "--checkpointing",
                         "--explain"], capsys)
    assert code == 0 and "recompute" in out and "docs/SOURCES.md#flash-attention-flops" in out
    assert set(CLASS_SOURCES.values()) <= _anchors()
