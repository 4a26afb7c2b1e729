"""Every invalid input is refused before anything runs: one line naming the problem and a fix, exit code 2.

Covers plan flags, config.json contents and the runner's Hydra config (the same rules: lorabench.validation),
with hypothesis fuzzing of config.json fields and of the runner's train/method/device values.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorabench.catalog import load_model
from lorabench.cli import main
from tests.conftest import run_cli_expecting_ok_or_one_line
from lorabench.errors import UserError
from lorabench.runconfig import job_overrides
from lorabench.sweep import CONF_DIR, check_job

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CFG = dict(load_model("tiny-llama").hf_config)


def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    return run_cli_expecting_ok_or_one_line(args, capsys, codes=(2,))


@pytest.mark.parametrize("args, needle", [
    (["--method", "adapters", "--reduction-factor", "4097"], "exceeds llama-2-7b's hidden size 4096"),
    (["--method", "lora", "--seq-len", "100000"], "max_position_embeddings 4096"),
    (["--method", "lora", "--sharding", "zero3", "--gpus", "1"], "shards nothing"),
    (["--method", "lora", "--sharding", "zero1"], "shards nothing"),
    (["--method", "lora", "--r", "5000"], "exceeds min(in, out)=4096"),
    (["--method", "qlora", "--r", "4097", "--target-modules", "q_proj"], "exceeds min(in, out)"),
])
def test_plan_refuses(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert needle in _refused(["plan", "--model", "7b", *args], capsys)


def test_long_context_is_allowed_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "7b", "--method", "lora", "--seq-len", "8192", "--allow-long-context",
                 "--gpu", "h100"]) == 0
    # Learned positions (GPT-2) never extend.
    assert "learned positions" in _refused(["plan", "--model", "gpt2", "--method", "lora", "--seq-len", "2048",
                                            "--allow-long-context"], capsys)


@pytest.mark.parametrize("change, needle", [
    ({"num_attention_heads": 6, "num_key_value_heads": 3}, "not divisible by num_attention_heads=6"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"hidden_size": "64"}, "hidden_size='64' is not an integer"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers=2.0 is not an integer"),
    ({"vocab_size": True}, "vocab_size=True is not an integer"),
    ({"num_attention_heads": 0}, "num_attention_heads=0"),
])
def test_config_json_refused(tmp_path: Path, change: dict, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CFG, **change}))
    assert needle in _refused(["plan", "--model", str(tmp_path), "--method", "lora"], capsys)


_JSON_VALUES = st.one_of(st.integers(-3, 5000), st.just(0), st.text(max_size=4), st.floats(allow_nan=True),
                         st.booleans(), st.none(), st.lists(st.integers(), max_size=2))
_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "num_hidden_layers",
           "vocab_size", "head_dim", "max_position_embeddings", "model_type", "tie_word_embeddings")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(_FIELDS), _JSON_VALUES, max_size=3),
       method=st.sampled_from(["lora", "adapters", "prefix", "qlora"]))
def test_fuzzed_config_json_plans_or_is_refused(tmp_path_factory: pytest.TempPathFactory, changes: dict,
                                                method: str, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "config.json").write_text(json.dumps({**LLAMA_CFG, **changes}))
    run_cli_expecting_ok_or_one_line(["plan", "--model", str(folder), "--method", method, "--seq-len", "64", "--gpu", "h100"], capsys)


# ---------------------------------------------------------------------------------------------- the runner
@pytest.fixture(scope="module")
def hydra_conf():  # type: ignore[no-untyped-def]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        yield


@pytest.mark.parametrize("overrides, needle", [
    (["train.precision=fp8"], "unknown precision 'fp8'"),
    (["device=tpu"], "unknown device 'tpu'"),
    (["train.seq_len=abc"], "train.seq_len='abc' is not an integer"),
    (["train.gradient_checkpointing=3"], "is not true or false"),
    (["+train.bogus=1"], "unknown train field 'bogus'"),
    (["train.num_gpus=4096", "train.sharding=zero3"], "exceeds the"),
    (["method=adapters", "method.reduction_factor=100000"], "exceeds"),
    (["method=lora", "method.r=0"], "rank r=0"),
    (["model=tiny-llama", "train.seq_len=1000000"], "max_position_embeddings"),
    (["optimizer.name=adam"], "unknown optimizer 'adam'"),
])
def test_runner_config_refused(hydra_conf, overrides: list[str], needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UserError, match=None) as info:
        check_job(compose(config_name="config", overrides=overrides))
    assert needle in str(info.value)


_RUN_VALUES = {
    "train.precision": st.sampled_from(["fp32", "bf16", "bf16-mixed", "fp8", "int4", "BF16"]),
    "train.seq_len": st.sampled_from(["64", "0", "-1", "abc", "1e3", "true", "999999999"]),
    "train.micro_batch_size": st.sampled_from(["1", "2", "0", "x", "null"]),
    "train.sharding": st.sampled_from(["none", "zero3", "zero4"]),
    "train.attention": st.sampled_from(["sdpa", "eager", "flash"]),
    "device": st.sampled_from(["cpu", "auto", "tpu", "CUDA"]),
    "method": st.sampled_from(["lora", "qlora", "ia3", "prefix", "adapters", "full"]),
    "optimizer": st.sampled_from(["adamw", "sgd", "adamw_8bit"]),
}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.fixed_dictionaries({}, optional=_RUN_VALUES))
def test_fuzzed_runner_config_is_valid_or_refused(hydra_conf, values: dict) -> None:  # type: ignore[no-untyped-def]
    cfg = compose(config_name="config", overrides=[f"{k}={v}" for k, v in values.items()])
    try:
        check_job(cfg)
    except UserError as err:
        assert "\n" not in str(err)


def test_multirun_grid_expansion_matches_hydra(hydra_conf) -> None:  # type: ignore[no-untyped-def]
    cfg = compose(config_name="config", overrides=["sweep=cpu-smoke"], return_hydra_config=True)
    cfg.hydra.overrides.task = ["sweep=cpu-smoke", "train.seq_len=32,64"]
    jobs = job_overrides(cfg)
    assert len(jobs) == 6 * 2 * 2 * 2  # methods x precisions x checkpointing (preset) x seq_len (command line)
    assert all(any(o.startswith("method=") for o in job) for job in jobs)


def test_cli_run_refuses_before_anything_runs(tmp_path: Path) -> None:
    for args in (["train.precision=fp8"], ["device=tpu"], ["-m", "method=lora,ia3", "train.precision=bf16,fp8"]):
        out = subprocess.run([sys.executable, "-m", "lorabench.cli", "run", *args, f"results_dir={tmp_path}",
                              f"hydra.sweep.dir={tmp_path}/h", f"hydra.run.dir={tmp_path}/h"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
        assert not (tmp_path / "adhoc").exists()  # nothing recorded


def test_adhoc_results_are_git_ignored() -> None:
    out = subprocess.run(["git", "check-ignore", "-q", "results/adhoc/records.jsonl"], cwd=ROOT)
    assert out.returncode == 0


@pytest.mark.parametrize("args, needle", [(["train.bogus=1"], "Could not override 'train.bogus'"),
                                          (["method=lorra"], "Could not find 'method/lorra'"),
                                          (["-m", "train.seq_len=32,64", "train.bogus=2"], "train.bogus")])
def test_run_hydra_composition_errors_are_one_line(args: list[str], needle: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from lorabench.commands.run import run_hydra

    assert run_hydra(args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
