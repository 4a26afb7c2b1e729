"""DoRA (use_dora on lora and qlora) vs PEFT's DoRA: same weights, bit-identical outputs and gradients; trainable
counts; saved adapters load in PeftModel; the 4-bit layer against PEFT's DoRA over its dequantized weight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from lorabench.catalog import load_model  # noqa: E402
from lorabench.memory.planner import predict  # noqa: E402
from lorabench.methods import make_config  # noqa: E402
from lorabench.methods.lora.layer import LoraLinear, save_adapter  # noqa: E402
from lorabench.runtime.build import build_model, count_trainable, prepare_model  # noqa: E402
from lorabench.specs import TrainSpec  # noqa: E402

IDS = torch.arange(40).remainder(29).add(3).view(2, 20)


def _randomize(model: Any, seed: int = 0) -> None:
    """B = 0 and m = ||W|| at init hide every difference: random A, B and a perturbed magnitude."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))


def _peft_key(key: str) -> str:
    key = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
    return "base_model.model." + key.replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")


def _twin(base: Any, ours: Any, autocast: bool = True, **kwargs: Any) -> Any:
    """PEFT's DoRA over ``base`` with our A, B and magnitudes copied in (``autocast=False``: PEFT keeps the
    adapters in the model's dtype, lorabench's adapter_dtype=bf16 on a bf16 model)."""
    twin = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", use_dora=True, **kwargs),
                               autocast_adapter_dtype=autocast)
    theirs = dict(twin.named_parameters())
    with torch.no_grad():
        for key, p in ours.named_parameters():
            if "lora_" in key:
                theirs[_peft_key(key)].copy_(p)
    return twin


CASES = [("tiny-llama", "fp32", {}, {}), ("tiny-llama", "bf16", {"lora_alpha": 16}, {"lora_alpha": 16}),
         ("tiny-llama", "bf16", {"adapter_dtype": "bf16"}, {"autocast": False}),
         ("tiny-qwen2", "fp32", {"target_modules": "all-linear"}, {"target_modules": "all-linear"}),
         ("tiny-gpt2", "fp32", {}, {"target_modules": ["c_attn"]})]


@pytest.mark.parametrize("name, precision, knobs, peft_kwargs", CASES)
def test_forward_backward_and_counts_equal_peft(name: str, precision: str, knobs: dict, peft_kwargs: dict) -> None:
    train = TrainSpec(precision=precision)
    cfg = make_config("lora", {"use_dora": True, **knobs})
    ours = prepare_model(load_model(name), cfg, train, seed=0)
    _randomize(ours)
    twin = _twin(build_model(load_model(name), train, seed=0), ours, **peft_kwargs)
    assert count_trainable(ours) == sum(p.numel() for p in twin.parameters() if p.requires_grad)
    assert count_trainable(ours) == predict(load_model(name), cfg, train).trainable_params
    got, want = ours(input_ids=IDS, labels=IDS), twin(input_ids=IDS, labels=IDS)
    tol = {"rtol": 0, "atol": 0}  # the same ops in the same order: bit-identical (fp32 and bf16)
    torch.testing.assert_close(got.logits, want.logits, **tol)
    got.loss.backward()
    want.loss.backward()
    theirs = dict(twin.named_parameters())
    for key, p in ours.named_parameters():
        if "lora_magnitude_vector" in key or ".lora_B." in key:
            torch.testing.assert_close(p.grad, theirs[_peft_key(key)].grad, **tol)


def test_magnitude_starts_at_the_row_norms_of_w() -> None:
    model = prepare_model(load_model("tiny-llama"), make_config("lora", {"use_dora": True}), TrainSpec(precision="fp32"), seed=0)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, LoraLinear)
    torch.testing.assert_close(layer.lora_magnitude_vector, layer.base_layer.weight.norm(dim=1))


def test_saved_dora_adapter_loads_in_peft(tmp_path: Path) -> None:
    spec, train = load_model("tiny-llama"), TrainSpec(precision="fp32")
    cfg = make_config("lora", {"use_dora": True})
    ours = prepare_model(spec, cfg, train, seed=0).eval()
    _randomize(ours)
    save_adapter(ours, tmp_path, spec, cfg)
    loaded = peft.PeftModel.from_pretrained(build_model(spec, train, seed=0), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, loaded(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_qlora_dora_equals_peft_dora_over_the_dequantized_weight() -> None:
    from lorabench.methods.common import dequantize_module_weight, replace_module

    spec, train = load_model("tiny-llama"), TrainSpec(precision="fp32")
    cfg = make_config("qlora", {"use_dora": True, "compute_dtype": "fp32"})
    ours = prepare_model(spec, cfg, train, seed=0)
    _randomize(ours)
    base = build_model(spec, train, seed=0)
    for name, module in ours.named_modules():  # the same (dequantized) weights in a dense twin
        if isinstance(module, LoraLinear):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            with torch.no_grad():
                dense.weight.copy_(dequantize_module_weight(module.base_layer))
            replace_module(base, name, dense)
    dense_params = dict(base.named_parameters())
    with torch.no_grad():  # the 4-bit build initialises the rest in its own order: copy it too
        for key, p in ours.named_parameters():
            if "lora_" not in key and key in dense_params:
                dense_params[key].copy_(p)
    twin = _twin(base, ours, target_modules="all-linear")
    assert count_trainable(ours) == sum(p.numel() for p in twin.parameters() if p.requires_grad)
    got, want = ours(input_ids=IDS, labels=IDS), twin(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
