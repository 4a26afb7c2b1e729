"""LoRA on Mixtral's fused experts: lorabench's counts of what PEFT trains, checked against PEFT on meta."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from lorabench.catalog import load_model  # noqa: E402
from lorabench.commands.notes import method_notes  # noqa: E402
from lorabench.memory.planner import predict  # noqa: E402
from lorabench.methods import make_config  # noqa: E402
from lorabench.methods.fused_experts import fused_matrices, param_wrapper_params, peft_all_linear_extra_params  # noqa: E402
from lorabench.runtime.build import build_model  # noqa: E402
from lorabench.specs import TrainSpec  # noqa: E402

TRAIN = TrainSpec(precision="bf16")


def _peft_count(name: str, **kw: Any) -> int:
    base = build_model(load_model(name), TRAIN, device="meta")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that its gate_up_proj rank pattern matched no module
        model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name, r", [("tiny-mixtral", 4), ("mixtral-8x7b", 8)])
def test_all_linear_matches_peft(name: str, r: int) -> None:
    spec = load_model(name)
    ours = predict(spec, make_config("lora", {"r": r, "target_modules": "all-linear"}), TRAIN).trainable_params
    want = _peft_count(name, r=r, lora_alpha=r, target_modules="all-linear")
    assert ours + peft_all_linear_extra_params(spec, r) == want
    if name == "mixtral-8x7b":
        assert (ours, want) == (6_815_744, 179_832_832)


def test_target_parameters_on_experts_match_peft() -> None:
    spec = load_model("tiny-mixtral")
    experts = [m for m in fused_matrices(spec) if ".experts." in m.name]
    want = _peft_count("tiny-mixtral", r=4, target_modules=[],
                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    assert spec.num_layers * sum(param_wrapper_params(m, 4) for m in experts) == want


def test_notes_say_what_lora_trains_on_mixtral() -> None:
    spec = load_model("mixtral")
    cfg = make_config("qlora", {"target_modules": "all-linear"})
    notes = method_notes(spec, cfg, predict(spec, cfg, TRAIN), TRAIN)
    assert "q_proj, k_proj, v_proj, o_proj only (6.82M" in notes[0] and "--target-parameters experts" in notes[0]
    assert "179.83M trainable" in notes[1] and "bitsandbytes#1849" in notes[2] and "stay in 16-bit" in notes[2]
    dense = load_model("7b")
    assert method_notes(dense, cfg, predict(dense, cfg, TRAIN), TRAIN) == []


def test_notes_name_the_adapted_experts_and_their_fold() -> None:
    spec = load_model("mixtral")
    cfg = make_config("lora", {"target_parameters": "experts"})
    notes = method_notes(spec, cfg, predict(spec, cfg, TRAIN), TRAIN)
    assert "through target_parameters, mlp.experts.gate_up_proj, mlp.experts.down_proj (108.27M" in notes[0]
    # E (2 I h + h I) bf16 elements a layer: 8 * 3 * 14336 * 4096 * 2 bytes = 2.62 GiB
    assert "(2.62 GiB a layer)" in notes[1]


def test_qlora_keeps_mixtral_experts_in_16_bit() -> None:
    """As transformers + bitsandbytes do: only nn.Linear modules become 4-bit."""
    spec = load_model("mixtral")
    pred = predict(spec, make_config("qlora"), TRAIN)
    attention = spec.num_layers * sum(m.weight_params for m in spec.linear_matrices())
    assert spec.num_layers * sum(m.weight_params for m in spec.quantized_matrices()) == attention
    assert pred.components["weights"] == (spec.total_params - attention) * 2


def test_compare_adds_expert_rows_on_moe_models_only(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from lorabench.cli import main

    def methods(model: str) -> dict[str, int]:
        assert main(["compare", "--model", model, "--format", "json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        return {(m["method"]["method"] + ("+experts" if m["method"].get("target_parameters") else "")):
                m["prediction"]["trainable_params"] for m in doc["methods"] if not m["method"].get("use_dora")}

    moe = methods("mixtral")
    experts = 32 * 8 * 8 * ((4096 + 2 * 14336) + (14336 + 4096))  # L E r (in + out), gate_up and down
    assert moe["lora+experts"] == moe["lora"] + experts and "qlora+experts" in moe
    assert not any("+experts" in name for name in methods("7b"))
