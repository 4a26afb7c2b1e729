"""The runtime's trainable-parameter counts equal PEFT's (models built on meta), and the adapters formula."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lorabench.catalog import load_model  # noqa: E402
from lorabench.methods import make_config  # noqa: E402
from lorabench.runtime.build import build_model, count_trainable, prepare_model  # noqa: E402
from lorabench.specs import TrainSpec  # noqa: E402



MODELS = ["llama-2-7b", "llama-3-8b", "qwen2.5-7b", "tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"]
TRAIN = TrainSpec(precision="bf16")


def _peft_count(name: str, peft_config: Any) -> int:
    base = build_model(load_model(name), TRAIN, device="meta")
    with torch.device("meta"):  # PEFT allocates its adapters on the default device
        model = peft.get_peft_model(base, peft_config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _ours(name: str, method: str, **knobs: Any) -> int:
    return count_trainable(prepare_model(load_model(name), make_config(method, knobs), TRAIN, device="meta"))


@pytest.mark.parametrize("name", MODELS)
def test_lora_default_matches_peft(name: str) -> None:
    assert _ours(name, "lora") == _peft_count(name, peft.LoraConfig(task_type="CAUSAL_LM"))


@pytest.mark.parametrize("name", ["llama-3-8b", "qwen2.5-7b", "tiny-gpt2"])
def test_lora_all_linear_r16_matches_peft(name: str) -> None:
    want = _peft_count(name, peft.LoraConfig(task_type="CAUSAL_LM", r=16, target_modules="all-linear"))
    assert _ours(name, "lora", r=16, target_modules="all-linear") == want


@pytest.mark.parametrize("name", MODELS)
def test_ia3_default_matches_peft(name: str) -> None:
    assert _ours(name, "ia3") == _peft_count(name, peft.IA3Config(task_type="CAUSAL_LM"))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_matches_peft(name: str, projection: bool) -> None:
    want = _peft_count(name, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20,
                                                     prefix_projection=projection))
    assert _ours(name, "prefix", prefix_projection=projection) == want


def test_known_values_llama2_7b() -> None:
    assert _ours("llama-2-7b", "lora") == 4_194_304
    assert _ours("llama-2-7b", "ia3") == 614_400
    assert _ours("llama-2-7b", "prefix") == 20 * 2 * 32 * 4096


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b", "qwen2.5-7b", "tiny-gpt2"])
@pytest.mark.parametrize("placement", ["double_seq_bn", "seq_bn"])
def test_adapters_formula(name: str, placement: str) -> None:
    spec = load_model(name)
    h, m = spec.hidden_size, spec.hidden_size // 16
    per_layer = (2 if placement == "double_seq_bn" else 1) * (2 * h * m + m + h)
    assert _ours(name, "adapters", placement=placement) == spec.num_layers * per_layer
    if name == "llama-2-7b" and placement == "double_seq_bn":
        assert _ours(name, "adapters") == 134_496_256


@pytest.mark.parametrize("name", ["llama-2-7b", "qwen2.5-7b", "tiny-gpt2"])
def test_qlora_trains_lora_on_all_linear(name: str) -> None:
    want = _peft_count(name, peft.LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear"))
    assert _ours(name, "qlora") == want
