"""Recipes: defaults only (explicit flags and Hydra overrides win), one file for plan and run."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from lorabench.cli import build_parser, main
from lorabench.commands.common import specs_from_args
from lorabench.recipes import load_recipe, recipe_names
from lorabench.sweep import CONF_DIR, build_specs


def _specs(*argv: str):  # type: ignore[no-untyped-def]
    return specs_from_args(build_parser().parse_args(["plan", "--model", "7b", *argv]))


def test_the_four_recipes_exist() -> None:
    assert {"hf-lora", "hf-qlora", "qlora-paper", "lorabench"} <= set(recipe_names())


def test_hf_qlora_sets_the_stack() -> None:
    _, cfg, train = _specs("--recipe", "hf-qlora")
    assert cfg.name == "qlora" and (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)
    assert train.prepare_kbit and train.gradient_checkpointing and train.autocast_dtype == "bf16"
    assert train.optimizer.name == "adamw" and train.adamw_impl == "fused" and train.param_dtype == "fp32"


def test_explicit_flags_win_over_the_recipe() -> None:
    _, cfg, train = _specs("--recipe", "qlora-paper", "--r", "8", "--lora-dropout", "0.05", "--optimizer", "adamw")
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.05)
    assert train.optimizer.name == "adamw" and train.gradient_checkpointing
    _, cfg, _ = _specs("--recipe", "hf-qlora", "--method", "lora")
    assert cfg.name == "lora" and cfg.r == 16  # the recipe's LoRA knobs still apply; its QLoRA ones do not


def test_lorabench_recipe_needs_a_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "7b", "--recipe", "lorabench"]) == 2
    assert "no method given" in capsys.readouterr().err
    assert main(["plan", "--model", "7b", "--recipe", "hf-qlra"]) == 2
    assert "did you mean 'hf-qlora'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["hf-lora", "hf-qlora", "qlora-paper"])
def test_run_composes_the_same_recipe(name: str) -> None:
    recipe = load_recipe(name)
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=[f"recipe={name}", "model=llama-2-7b", "method.r=4"])
    specs = build_specs(cfg)
    _, planned_cfg, planned_train = _specs("--recipe", name, "--r", "4")
    assert specs.method == planned_cfg and specs.method.r == 4 and cfg.method.name == recipe.method
    assert (specs.train.param_dtype, specs.train.autocast_dtype, specs.train.gradient_checkpointing,
            specs.train.optimizer, specs.train.adamw_impl) == (
        planned_train.param_dtype, planned_train.autocast_dtype, planned_train.gradient_checkpointing,
        planned_train.optimizer, planned_train.adamw_impl)


def test_recipes_command_lists_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in recipe_names():
        assert sum(line.startswith(name + " ") for line in out.splitlines()) == 1


def test_peft_stack_refuses_prefix_with_checkpointing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "7b", "--recipe", "hf-lora", "--method", "prefix", "--checkpointing"]) == 2
    assert "PEFT refuses prefix tuning with gradient checkpointing" in capsys.readouterr().err
    # lorabench's own runtime runs it (traced in tests/runtime/test_trace_accuracy.py), so it is planned.
    assert main(["plan", "--model", "7b", "--recipe", "lorabench", "--method", "prefix", "--checkpointing",
                 "--gpu", "h100"]) == 0
    from lorabench.errors import UserError
    from lorabench.sweep import check_job

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=["recipe=hf-lora", "method=prefix",
                                                       "train.gradient_checkpointing=true", "device=cpu"])
    with pytest.raises(UserError, match="PEFT refuses prefix tuning"):
        check_job(cfg)
