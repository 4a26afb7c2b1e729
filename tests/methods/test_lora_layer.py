"""LoRA runtime vs PEFT: same forward with the same weights, merge/unmerge, PEFT-format save/load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from lorabench.catalog import load_model  # noqa: E402
from lorabench.errors import UserError  # noqa: E402
from lorabench.methods import make_config  # noqa: E402
from lorabench.methods.lora.layer import (LoraLinear, load_adapter, lora_modules, merge,  # noqa: E402
                                          save_adapter, unmerge)
from lorabench.runtime.build import build_model, prepare_model  # noqa: E402
from lorabench.specs import TrainSpec  # noqa: E402



IDS = torch.arange(40).remainder(29).add(3).view(2, 20)
FP32 = TrainSpec(precision="fp32")


def _randomize_lora(model: Any, seed: int = 0) -> None:
    """B is zero at init, which would hide any forward difference: give every A/B random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _peft_twin(name: str, ours: Any, train: TrainSpec, **lora_kwargs: Any) -> Any:
    """PEFT LoRA model over the same base weights (same seed), with our A/B copied in."""
    twin = peft.get_peft_model(build_model(load_model(name), train, seed=0),
                               peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    theirs = dict(twin.named_parameters())
    with torch.no_grad():
        for key, p in ours.named_parameters():
            if ".lora_" in key:
                key = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
                theirs["base_model.model." + key].copy_(p)
    return twin.eval()


def _logits(model: Any) -> Any:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("name,precision,knobs", [
    ("tiny-llama", "fp32", {}),
    ("tiny-llama", "bf16", {"r": 4, "lora_alpha": 16, "target_modules": "all-linear"}),
    ("tiny-qwen2", "fp32", {"use_rslora": True, "lora_alpha": 32}),
    ("tiny-gpt2", "fp32", {"target_modules": "c_attn,mlp.c_proj"}),
])
def test_forward_equals_peft(name: str, precision: str, knobs: dict[str, Any]) -> None:
    train = TrainSpec(precision=precision)
    cfg = make_config("lora", knobs)
    ours = prepare_model(load_model(name), cfg, train, seed=0).eval()
    _randomize_lora(ours)
    kwargs = {k: v for k, v in knobs.items()}
    if isinstance(kwargs.get("target_modules"), str) and kwargs["target_modules"] != "all-linear":
        kwargs["target_modules"] = kwargs["target_modules"].split(",")
    twin = _peft_twin(name, ours, train, **kwargs)
    assert {p.dtype for n, p in twin.named_parameters() if "lora_" in n} == {torch.float32}
    got, want = _logits(ours), _logits(twin)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_scaling_and_init() -> None:
    cfg = make_config("lora", {"r": 16, "lora_alpha": 32, "use_rslora": True})
    model = prepare_model(load_model("tiny-llama"), cfg, FP32)
    layers = [m for _, m in lora_modules(model)]
    assert len(layers) == 2 * 2  # q_proj, v_proj in 2 layers
    assert all(m.scaling == pytest.approx(32 / 4) for m in layers)
    assert all(torch.count_nonzero(m.lora_B.weight) == 0 for m in layers)
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in=64
    assert all(0 < m.lora_A.weight.abs().max() <= bound for m in layers)
    base = build_model(load_model("tiny-llama"), FP32, seed=0).eval()
    torch.testing.assert_close(_logits(model.eval()), _logits(base), rtol=0, atol=0)  # B = 0: unchanged


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_merge_unmerge(name: str) -> None:
    model = prepare_model(load_model(name), make_config("lora", {"target_modules": "all-linear"}),
                          FP32).eval()
    _randomize_lora(model)
    before = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = _logits(model)
    merge(model)
    assert all(m.merged for _, m in lora_modules(model))
    torch.testing.assert_close(_logits(model), unmerged, rtol=1e-4, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(_logits(model), unmerged, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def test_dropout_keeps_eval_exact_and_changes_train() -> None:
    model = prepare_model(load_model("tiny-llama"), make_config("lora", {"lora_dropout": 0.5}), FP32)
    _randomize_lora(model)
    layer = lora_modules(model)[0][1]
    assert isinstance(layer.lora_dropout, torch.nn.Dropout)
    x = torch.randn(2, 5, 64)
    no_drop = layer.base_layer(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling
    torch.testing.assert_close(layer.eval()(x), no_drop)
    assert not torch.allclose(layer.train()(x), no_drop)


def test_save_then_peft_from_pretrained(tmp_path: Path) -> None:
    spec = load_model("tiny-qwen2")
    cfg = make_config("lora", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    ours = prepare_model(spec, cfg, FP32, seed=0).eval()
    _randomize_lora(ours)
    save_adapter(ours, tmp_path, spec, cfg)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    loaded = peft.PeftModel.from_pretrained(build_model(spec, FP32, seed=0), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(loaded), _logits(ours), rtol=0, atol=0)
    # ... and our own loader into a fresh LoRA model
    fresh = prepare_model(spec, cfg, FP32, seed=0).eval()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), _logits(ours), rtol=0, atol=0)


def test_load_rejects_a_mismatched_adapter(tmp_path: Path) -> None:
    spec = load_model("tiny-llama")
    cfg = make_config("lora")
    save_adapter(prepare_model(spec, cfg, TrainSpec()), tmp_path, spec, cfg)
    other = prepare_model(spec, make_config("lora", {"target_modules": "all-linear"}), TrainSpec())
    with pytest.raises(UserError, match="does not match"):
        load_adapter(other, tmp_path)
    with pytest.raises(UserError, match="no adapter_model"):
        load_adapter(other, tmp_path / "missing")


def test_only_lora_is_trainable_and_wraps_gpt2_conv1d() -> None:
    model = prepare_model(load_model("tiny-gpt2"), make_config("lora"), TrainSpec(precision="bf16"))
    wrapped = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(wrapped) == 2 and all(m.fan_in_fan_out for m in wrapped)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
