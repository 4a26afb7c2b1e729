"""The planner's trainable-parameter counts equal PEFT's, on models built on the meta device."""

from __future__ import annotations

import pytest

from lorabench.catalog import load_model
from lorabench.memory.planner import predict
from lorabench.methods import make_config
from lorabench.specs import TrainSpec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

MODELS = ["llama-2-7b", "llama-3-8b", "qwen2.5-7b", "mistral-7b", "tiny-gpt2", "tiny-llama"]


def _peft_trainable(name: str, peft_config) -> int:  # type: ignore[no-untyped-def]
    spec = load_model(name)
    cfg = transformers.AutoConfig.for_model(**spec.hf_config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        wrapped = peft.get_peft_model(model, peft_config)
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def _planner_trainable(name: str, method: str, **knobs) -> int:  # type: ignore[no-untyped-def]
    return predict(load_model(name), make_config(method, knobs), TrainSpec()).trainable_params


@pytest.mark.parametrize("name", MODELS)
def test_lora_default(name: str) -> None:
    got = _planner_trainable(name, "lora")
    assert got == _peft_trainable(name, peft.LoraConfig(task_type="CAUSAL_LM"))


@pytest.mark.parametrize("name", MODELS)
def test_lora_all_linear_r16(name: str) -> None:
    got = _planner_trainable(name, "lora", r=16, target_modules="all-linear")
    want = _peft_trainable(name, peft.LoraConfig(task_type="CAUSAL_LM", r=16, target_modules="all-linear"))
    assert got == want


@pytest.mark.parametrize("name", MODELS)
def test_ia3_default(name: str) -> None:
    assert _planner_trainable(name, "ia3") == _peft_trainable(name, peft.IA3Config(task_type="CAUSAL_LM"))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("projection", [False, True])
def test_prefix(name: str, projection: bool) -> None:
    got = _planner_trainable(name, "prefix", num_virtual_tokens=20, prefix_projection=projection)
    want = _peft_trainable(name, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20,
                                                         prefix_projection=projection))
    assert got == want


def test_reference_values() -> None:
    assert _planner_trainable("llama-2-7b", "lora") == 4_194_304
    assert _planner_trainable("llama-2-7b", "ia3") == 614_400
    assert _planner_trainable("llama-2-7b", "adapters") == 134_496_256
    assert _planner_trainable("llama-2-7b", "full") == 6_738_415_616
