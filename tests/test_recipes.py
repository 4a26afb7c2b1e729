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


def test_the_stack_is_one_trainspec_field_recipes_set_and_flags_win() -> None:
    assert _specs("--recipe", "hf-qlora")[2].stack == "peft" and _specs("--method", "qlora")[2].stack == "lorabench"
    assert _specs("--recipe", "hf-qlora", "--stack", "lorabench")[2].stack == "lorabench"
    assert load_recipe("hf-lora").stack == "peft" and load_recipe("lorabench").stack == "lorabench"
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=["recipe=qlora-paper", "model=llama-2-7b"])
    assert build_specs(cfg).train.stack == "peft"
    with pytest.raises(SystemExit, match="2"):
        main(["plan", "--model", "7b", "--method", "lora", "--stack", "hf"])


def test_run_executes_the_peft_stack_where_it_can_and_refuses_the_rest() -> None:
    from lorabench.errors import UserError
    from lorabench.sweep import check_job

    def job(*overrides: str):  # type: ignore[no-untyped-def]
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose(config_name="config", overrides=["model=tiny-llama", "device=cpu", *overrides])

    assert check_job(job("recipe=hf-lora")).train.stack == "peft"
    assert check_job(job("recipe=hf-lora", "train.stack=lorabench")).train.stack == "lorabench"
    for overrides, words in ((("recipe=hf-qlora",), "mis-dequantize rows of 176"),  # bitsandbytes on the CPU
                             (("method=prefix", "train.stack=peft"), "runs LoRA and QLoRA"),
                             (("recipe=hf-lora", "train.num_gpus=2"), "runs on one device")):
        with pytest.raises(UserError, match=words):
            check_job(job(*overrides))


def test_the_load_phase_scratch_is_the_quantizer_of_the_stack() -> None:
    """70B's largest matrix (28672 x 8192): lorabench's 13-byte 4M-element chunks (52 MiB) vs bitsandbytes'
    double-quant absmax temporaries, 8 bytes per 64-block (28 MiB); none without double quantization."""
    from lorabench.memory.load import quantize_scratch_bytes
    from lorabench.methods import make_config
    from lorabench.specs import TrainSpec

    n, qlora = 28672 * 8192, make_config("qlora")
    assert quantize_scratch_bytes(n, qlora, TrainSpec()) == 13 * (1 << 22) == 52 * 2**20
    assert quantize_scratch_bytes(n, qlora, TrainSpec(stack="peft")) == 8 * n // 64 == 28 * 2**20
    bnb = make_config("qlora", {"backend": "bitsandbytes"})
    assert quantize_scratch_bytes(n, bnb, TrainSpec()) == 28 * 2**20
    assert quantize_scratch_bytes(n, make_config("qlora", {"double_quant": False}), TrainSpec(stack="peft")) == 0


def test_qlora_paper_keeps_the_norms_in_fp32() -> None:
    """2 h L + h norm elements at 4 B instead of 2 (LLaMA 65B: 1,318,912), and fp32 norms are a knob of a
    frozen base: full fine-tuning refuses it."""
    from lorabench.catalog import load_model
    from lorabench.memory.planner import predict

    spec, cfg, train = _specs("--recipe", "qlora-paper")
    assert train.norm_dtype == "fp32" and train.norm_param_dtype == "fp32" and train.param_dtype == "bf16"
    bf16_norms = _specs("--recipe", "qlora-paper", "--norm-dtype", "bf16")[2]
    norms = 2 * spec.hidden_size * spec.num_layers + spec.hidden_size
    assert spec.params_by_kind()["norms"] == norms
    assert (predict(spec, cfg, train).state_bytes["weights"]
            - predict(spec, cfg, bf16_norms).state_bytes["weights"]) == 2 * norms
    assert load_model("65b").params_by_kind()["norms"] == 1_318_912
    assert main(["plan", "--model", "7b", "--method", "full", "--norm-dtype", "fp32"]) == 2
