"""The CLI: cold start without torch, one-line errors with exit 2, property-based argument fuzzing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorabench.cli import main
from tests.conftest import run_cli_expecting_ok_or_one_line
from lorabench.methods import METHOD_NAMES


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_does_not_import_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from lorabench.cli import main\n"
        "rc = main(['plan', '--model', '70b', '--method', 'qlora'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'pandas', 'matplotlib') if m in sys.modules]\n"
        "print('HEAVY', heavy, rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY [] 0" in out


def test_plan_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["plan", "--model", "70b", "--method", "qlora"], capsys)
    assert code == 0 and "quantized_weights" in out and "h100-80gb" in out
    code, out, _ = _run(["plan", "--model", "7b", "--method", "lora", "--format", "json"], capsys)
    doc = json.loads(out)
    assert doc["prediction"]["trainable_params"] == 4_194_304
    assert doc["prediction"]["device_bytes"] == sum(doc["prediction"]["components"].values())


def test_plan_explain_and_csv(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["plan", "--model", "7b", "--method", "qlora", "--explain"], capsys)
    assert code == 0 and "Dettmers" in out and "docs/SOURCES.md#nf4" in out
    code, out, _ = _run(["plan", "--model", "7b", "--method", "full", "--format", "csv"], capsys)
    assert out.splitlines()[0].startswith("kind,name,bytes,GiB")


def test_machine_readable_formats_carry_numbers_verdicts_and_explain(capsys: pytest.CaptureFixture[str]) -> None:
    import csv
    import io

    code, out, _ = _run(["plan", "--model", "70b", "--method", "qlora", "--format", "json", "--explain"], capsys)
    doc = json.loads(out)
    total = next(r for r in doc["rows"] if r["component"] == "total (device)")
    assert total["bytes"] == doc["prediction"]["device_bytes"] and isinstance(total["GiB"], float)
    verdict = next(v for v in doc["verdicts"] if v["gpu"] == "h100-80gb")
    assert verdict["fits"] is True and isinstance(verdict["headroom_bytes"], int)
    assert isinstance(verdict["max micro-batch"], int)
    assert {r["component"] for r in doc["explain"]} >= {"gradients", "activations"}
    code, out, _ = _run(["plan", "--model", "70b", "--method", "qlora", "--format", "csv", "--explain",
                         "--gpu", "t4"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    kinds = {r["kind"] for r in rows}
    assert kinds == {"component", "verdict", "explain"}
    assert next(r for r in rows if r["kind"] == "verdict")["fits"] == "false"
    code, out, _ = _run(["plan", "--model", "7b", "--method", "lora", "--format", "markdown", "--explain"], capsys)
    assert code == 0 and "| formula" in out.replace("  ", " ")


def test_compare_lists_six_methods(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["compare", "--model", "7b"], capsys)
    assert code == 0
    for name in METHOD_NAMES:
        assert f"\n{name} " in out


@pytest.mark.parametrize("args, needle", [
    (["plan", "--model", "llama-2-7", "--method", "lora"], "did you mean"),
    (["plan", "--model", "7b", "--method", "lora", "--r", "0"], "rank r=0"),
    (["plan", "--model", "7b", "--method", "lora", "--batch", "0"], "must be >= 1"),
    (["plan", "--model", "7b", "--method", "ia3", "--r", "4"], "does not apply to method 'ia3'"),
    (["plan", "--model", "7b", "--method", "lora", "--gpu", "h1000"], "unknown GPU"),
    (["plan", "--model", "7b", "--method", "lorra"], "invalid choice"),
    (["plan", "--model", "/nonexistent/config.json", "--method", "lora"], "no config.json"),
    (["plan", "--model", "gpt2", "--method", "lora", "--seq-len", "4096"], "learned positions"),
    (["plan", "--model", "7b", "--method", "qlora", "--backend", "cuda"], "backend"),
])
def test_bad_input_one_line_exit_2(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_malformed_config_json_exit_2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "config.json").write_text("{oops")
    code, _, err = _run(["plan", "--model", str(tmp_path), "--method", "lora"], capsys)
    assert code == 2 and "not valid JSON" in err


_TOKENS = st.sampled_from(["--model", "--method", "--r", "--batch", "--seq-len", "--gpu", "--gpus", "--sharding",
                           "--precision", "--optimizer", "--num-virtual-tokens", "--reduction-factor", "7b", "tiny-llama",
                           "lora", "qlora", "ia3", "full", "prefix", "adapters", "0", "-3", "8", "1e9", "zero3", "h100",
                           "bf16", "fp9", "sgd", "x", "", "--checkpointing", "--explain", "--format", "json"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(_TOKENS, max_size=8))
def test_cli_never_tracebacks(tokens: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    run_cli_expecting_ok_or_one_line(["plan", *tokens], capsys)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(METHOD_NAMES), batch=st.integers(1, 64), seq=st.integers(1, 4096),
       gpus=st.integers(1, 16), sharding=st.sampled_from(["none", "zero1", "zero2", "zero3"]))
def test_valid_args_always_plan(method: str, batch: int, seq: int, gpus: int, sharding: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    sharding = sharding if gpus > 1 else "none"  # sharding over one GPU is refused (tests/test_validation.py)
    code, out, err = _run(["plan", "--model", "7b", "--method", method, "--batch", str(batch), "--seq-len", str(seq),
                           "--gpus", str(gpus), "--sharding", sharding, "--gpu", "h100", "--format", "json"], capsys)
    assert code == 0, err
    assert json.loads(out)["prediction"]["device_bytes"] > 0


def test_compare_json_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["compare", "--model", "7b", "--format", "json"], capsys)
    rows = {r["method"]: r for r in json.loads(out)["rows"]}
    assert rows["full"]["fits h100-80gb"] is False and rows["qlora"]["fits h100-80gb"] is True
    assert isinstance(rows["lora"]["total GiB"], float) and isinstance(rows["lora"]["max micro-batch"], int)
