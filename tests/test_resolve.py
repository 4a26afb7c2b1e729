"""One defaults resolver: the same inputs give the same specs through plan, compare, trace and run."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from lorabench.catalog import CONF_DIR, load_model
from lorabench.cli import build_parser
from lorabench.commands import compare
from lorabench.commands.common import specs_from_args
from lorabench.resolve import resolve_train
from lorabench.sweep import build_specs

CASES = [("gemma-2-9b", "full"), ("gemma-2-9b", "lora"), ("tiny-llama", "full"), ("tiny-llama", "qlora"),
         ("gpt2", "prefix")]


@pytest.fixture(scope="module")
def hydra_compose():  # type: ignore[no-untyped-def]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        yield lambda overrides: compose("config", overrides=overrides)


@pytest.mark.parametrize("model, method", CASES)
def test_same_specs_through_plan_compare_trace_and_run(hydra_compose, model: str, method: str) -> None:
    parser = build_parser()
    flags = ["--model", model, "--seq-len", "256", "--batch", "2"]
    through = {
        "plan": specs_from_args(parser.parse_args(["plan", *flags, "--method", method]))[1:],
        "trace": specs_from_args(parser.parse_args(["trace", *flags, "--method", method]))[1:],
        "compare": compare.specs(load_model(model), method, parser.parse_args(["compare", *flags])),
    }
    run = build_specs(hydra_compose([f"model={model}", f"method={method}", "train.seq_len=256",
                                     "train.micro_batch_size=2"]))
    through["run"] = (run.method, run.train)
    assert len(set(through.values())) == 1, through
    method_cfg, train = through["plan"]
    spec = load_model(model)
    assert train.precision == ("bf16-mixed" if method == "full" else "bf16")
    assert train.attention == ("sdpa" if spec.traits.supports_sdpa else "eager")
    assert train == resolve_train({"seq_len": 256, "micro_batch_size": 2}, method, spec)


def test_explicit_values_win_over_resolved_defaults(hydra_compose) -> None:
    run = build_specs(hydra_compose(["model=gemma-2-9b", "method=full", "train.precision=bf16",
                                     "train.attention=sdpa"]))
    assert (run.train.precision, run.train.attention) == ("bf16", "sdpa")
    args = build_parser().parse_args(["plan", "--model", "gemma-2-9b", "--method", "full", "--precision", "bf16"])
    assert specs_from_args(args)[2].precision == "bf16"


def test_every_field_is_a_flag() -> None:
    """A knob is one field: every TrainSpec field (the optimizer by name) and every method-config field has a
    generated flag, with the field's docstring as its help."""
    import dataclasses

    from lorabench.methods import CONFIGS
    from lorabench.specs import TrainSpec

    plan = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "plan")[1]
    helps = {a.dest: a.help or "" for a in plan._actions}
    fields = [f.name for f in dataclasses.fields(TrainSpec)]
    fields += [f.name for cls in CONFIGS.values() for f in dataclasses.fields(cls)]
    assert set(fields) <= set(helps), set(fields) - set(helps)
    assert all(helps[name].strip() and not helps[name].startswith("(") for name in fields if name != "optimizer")
