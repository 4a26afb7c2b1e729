"""IA3 runtime vs PEFT: same forward with the same (random) vectors, PEFT-format save/load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from lorabench.catalog import load_model  # noqa: E402
from lorabench.methods import make_config  # noqa: E402
from lorabench.methods.ia3.layer import IA3Linear, load_adapter, save_adapter  # noqa: E402
from lorabench.runtime.build import build_model, prepare_model  # noqa: E402
from lorabench.specs import TrainSpec  # noqa: E402



IDS = torch.arange(32).remainder(23).add(5).view(2, 16)


def _randomize(model: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ia3_l"):
                p.copy_(1 + torch.randn(p.shape, generator=gen))


def _logits(model: Any) -> Any:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("name,precision", [("tiny-llama", "fp32"), ("tiny-llama", "bf16"),
                                            ("tiny-qwen2", "fp32"), ("tiny-gpt2", "fp32")])
def test_forward_equals_peft(name: str, precision: str) -> None:
    train = TrainSpec(precision=precision)
    ours = prepare_model(load_model(name), make_config("ia3"), train, seed=0).eval()
    _randomize(ours)
    twin = peft.get_peft_model(build_model(load_model(name), train, seed=0),
                               peft.IA3Config(task_type="CAUSAL_LM")).eval()
    theirs = dict(twin.named_parameters())
    with torch.no_grad():
        for key, p in ours.named_parameters():
            if key.endswith("ia3_l"):
                twin_p = theirs[f"base_model.model.{key}.default"]
                assert twin_p.shape == p.shape and twin_p.dtype == p.dtype == torch.float32
                twin_p.copy_(p)
    torch.testing.assert_close(_logits(ours), _logits(twin), rtol=0, atol=0)


def test_feedforward_scales_input_others_output() -> None:
    spec = load_model("tiny-llama")
    model = prepare_model(spec, make_config("ia3"), TrainSpec(precision="fp32"))
    layer = model.model.layers[0]
    k, down = layer.self_attn.k_proj, layer.mlp.down_proj
    assert isinstance(k, IA3Linear) and isinstance(down, IA3Linear)
    assert not k.is_feedforward and k.ia3_l.shape == (spec.num_kv_heads * spec.head_dim, 1)
    assert down.is_feedforward and down.ia3_l.shape == (1, spec.intermediate_size)
    assert all(torch.equal(m.ia3_l, torch.ones_like(m.ia3_l)) for m in model.modules() if isinstance(m, IA3Linear))
    with torch.no_grad():
        k.ia3_l.fill_(2.0)
        down.ia3_l.fill_(3.0)
    x = torch.randn(1, 3, 64)
    torch.testing.assert_close(k(x), 2 * k.base_layer(x))
    h = torch.randn(1, 3, spec.intermediate_size)
    torch.testing.assert_close(down(h), down.base_layer(3 * h))


def test_save_then_peft_from_pretrained(tmp_path: Path) -> None:
    spec = load_model("tiny-mistral")
    cfg = make_config("ia3")
    train = TrainSpec(precision="fp32")
    ours = prepare_model(spec, cfg, train, seed=0).eval()
    _randomize(ours)
    save_adapter(ours, tmp_path, spec, cfg)
    loaded = peft.PeftModel.from_pretrained(build_model(spec, train, seed=0), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(loaded), _logits(ours), rtol=0, atol=0)
    fresh = load_adapter(prepare_model(spec, cfg, train, seed=0).eval(), tmp_path)
    torch.testing.assert_close(_logits(fresh), _logits(ours), rtol=0, atol=0)
