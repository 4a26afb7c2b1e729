"""advise: every ranked configuration fits with headroom and is sorted by time, the Pareto set is exactly the
non-dominated one, each row's plan command reproduces its prediction, and the CLI is torch-free and fast."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from lorabench import advise
from lorabench.catalog import load_gpu, load_model
from lorabench.cli import main

MODEL, GPU = load_model("7b"), load_gpu("a6000")


@pytest.fixture(scope="module")
def result() -> advise.Advice:
    return advise.search(MODEL, GPU, seq_len=1024, global_batch=16, tokens=1e8)


def test_ranked_fit_with_headroom_sorted_by_time(result: advise.Advice) -> None:
    assert result.ranked and result.searched > len(result.ranked)
    usable = GPU.memory_bytes * 0.95
    assert all(c.prediction.device_bytes - c.prediction.spillable_bytes <= usable for c in result.ranked)
    times = [c.step.step_time_s for c in result.ranked]
    assert times == sorted(times)
    assert all(c.train.micro_batch_size * c.train.grad_accum_steps == 16 for c in result.ranked)


def test_pareto_is_the_non_dominated_set(result: advise.Advice) -> None:
    def dominated(c: advise.Candidate) -> bool:
        return any(o.step.step_time_s <= c.step.step_time_s and o.prediction.device_bytes < c.prediction.device_bytes
                   or o.step.step_time_s < c.step.step_time_s and o.prediction.device_bytes <= c.prediction.device_bytes
                   for o in result.ranked)
    assert result.pareto and not any(dominated(c) for c in result.pareto)
    members = {id(c) for c in result.pareto}
    assert all(dominated(c) or any(p.step.step_time_s == c.step.step_time_s and
                                   p.prediction.device_bytes == c.prediction.device_bytes for p in result.pareto)
               for c in result.ranked if id(c) not in members)


def test_near_misses_do_not_fit_and_say_why(result: advise.Advice) -> None:
    assert result.near_misses and not any(c.fits for c in result.near_misses)
    assert "GiB usable on rtx-a6000-48gb" in result.near_misses[0].why_not(GPU, 0.05)


def test_plan_command_reproduces_the_row(result: advise.Advice, capsys: pytest.CaptureFixture[str]) -> None:
    for cand in (result.ranked[0], result.pareto[-1]):
        plan, run = advise.commands(MODEL, GPU, cand)
        assert run.startswith("lorabench run model=llama-2-7b")
        code = main([*shlex.split(plan)[1:], "--format", "json"])
        doc = json.loads(capsys.readouterr().out)
        assert code == 0 and doc["prediction"]["device_bytes"] == cand.prediction.device_bytes
        assert doc["prediction"]["step_time_s"] == pytest.approx(cand.step.step_time_s)


def test_json_and_speed_without_torch() -> None:
    code = ("import sys, json, time; from lorabench.cli import main; t = time.perf_counter(); "
            "rc = main(['advise', '--model', '70b', '--gpu', 'a6000', '--tokens', '1e8', '--format', 'json']); "
            "print('RC', rc, time.perf_counter() - t, [m for m in ('torch', 'transformers', 'pandas') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    doc = json.loads(out[:out.rindex("RC")])
    rc, seconds, heavy = out[out.rindex("RC"):].split(" ", 3)[1:]
    assert rc == "0" and heavy.strip() == "[]"
    assert doc["configurations"] and all(c["fits"] for c in doc["configurations"])
    assert doc["configurations"][0]["plan_command"].startswith("lorabench plan --model llama-2-70b")
    assert doc["configurations"][0]["cost_usd"] > 0 and doc["pareto"][0] == 0


def test_bad_input_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["advise", "--model", "7b", "--gpu", "h100", "--gpus", "3"]) == 2
    err = capsys.readouterr().err
    assert "not a multiple of --gpus 3" in err and len(err.strip().splitlines()) == 1


def test_recipes_are_searched_and_their_commands_reproduce_them(result: advise.Advice,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    recipes = [c for c in result.ranked if c.recipe]
    assert {c.recipe for c in recipes} >= {"hf-lora", "qlora-paper"}
    cand = recipes[0]
    plan, run = advise.commands(MODEL, GPU, cand)
    assert f"--recipe {cand.recipe}" in plan and f"recipe={cand.recipe}" in run
    assert main([*shlex.split(plan)[1:], "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["prediction"]["device_bytes"] == cand.prediction.device_bytes
    assert doc["prediction"]["step_time_s"] == pytest.approx(cand.step.step_time_s)


@pytest.mark.parametrize("flag", ["--gpus", "--seq-len", "--global-batch", "--top"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_counts_below_one_are_one_usage_line(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--gpus 0 used to end in a ZeroDivisionError traceback, --global-batch 0 in an empty 'nothing fits'."""
    with pytest.raises(SystemExit) as exc:
        main(["advise", "--model", "7b", "--gpu", "h100", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}" in err and "Traceback" not in err


def test_moe_models_also_search_expert_lora_and_its_commands_reproduce_it(capsys: pytest.CaptureFixture[str]) -> None:
    mixtral, h200 = load_model("mixtral"), load_gpu("h200")
    found = advise.search(mixtral, h200, seq_len=1024, global_batch=8)
    experts = [c for c in found.ranked if getattr(c.method, "target_parameters", None)]
    assert experts and all(0 < c.step.mfu < 1 for c in found.ranked)
    plan, _ = advise.commands(mixtral, h200, experts[0])
    assert "--target-parameters experts" in plan
    assert main([*shlex.split(plan)[1:], "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["prediction"]["device_bytes"] == experts[0].prediction.device_bytes
    assert not any(getattr(c.method, "target_parameters", None) for c in advise.search(MODEL, GPU, global_batch=4).ranked)
