"""Bottleneck adapters: placement, identity at init, dtypes and the adapter's own math."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lorabench.catalog import load_model  # noqa: E402
from lorabench.methods import make_config  # noqa: E402
from lorabench.methods.adapters.layer import BottleneckAdapter, WithAdapter  # noqa: E402
from lorabench.runtime.build import build_model, prepare_model  # noqa: E402
from lorabench.specs import TrainSpec  # noqa: E402



IDS = torch.arange(30).remainder(17).add(2).view(2, 15)


@pytest.mark.parametrize("name,sites", [("tiny-llama", ["self_attn.o_proj", "mlp"]),
                                        ("tiny-gpt2", ["attn.c_proj", "mlp"]),
                                        ("tiny-mixtral", ["self_attn.o_proj", "mlp"])])
def test_placement_and_identity_at_init(name: str, sites: list[str]) -> None:
    spec = load_model(name)
    train = TrainSpec(precision="bf16")
    model = prepare_model(spec, make_config("adapters"), train, seed=0).eval()
    wrapped = sorted(n.split(".", 3)[-1] for n, m in model.named_modules() if isinstance(m, WithAdapter))
    assert wrapped == sorted(sites * spec.num_layers)
    m = spec.hidden_size // 16
    for adapter in (m for m in model.modules() if isinstance(m, BottleneckAdapter)):
        assert adapter.down.weight.shape == (m, spec.hidden_size) and adapter.down.bias is not None
        assert adapter.up.weight.shape == (spec.hidden_size, m)
        assert adapter.down.weight.dtype == torch.float32
        assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.up.bias) == 0
        assert adapter.down.weight.std().item() == pytest.approx(0.02, rel=0.3)
    base = build_model(spec, train, seed=0).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, base(input_ids=IDS).logits, rtol=0, atol=0)


def test_seq_bn_has_one_adapter_after_the_mlp() -> None:
    model = prepare_model(load_model("tiny-qwen2"), make_config("adapters", {"placement": "seq_bn"}), TrainSpec())
    names = [n for n, m in model.named_modules() if isinstance(m, WithAdapter)]
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_adapter_math_and_dtype_round_trip() -> None:
    adapter = BottleneckAdapter(8, 2, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape))
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    want = x.float() + adapter.up(torch.nn.functional.silu(adapter.down(x.float())))
    got = adapter(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=0, atol=0)


def test_only_adapters_trainable() -> None:
    model = prepare_model(load_model("tiny-llama"), make_config("adapters", {"reduction_factor": 8}),
                          TrainSpec(precision="fp16"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".adapter." in n for n in names)
    assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad} == {torch.float16}
