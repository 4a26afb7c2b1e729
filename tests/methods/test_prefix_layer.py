"""Prefix tuning: shapes, finite loss, logits equal to PEFT's prefix tuning (transformers 5), checkpointing."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from lorabench.catalog import load_model  # noqa: E402
from lorabench.methods import make_config  # noqa: E402
from lorabench.methods.prefix.layer import PrefixModel, token_dim  # noqa: E402
from lorabench.runtime.build import build_model, prepare_model  # noqa: E402
from lorabench.specs import TrainSpec  # noqa: E402



V = 5
IDS = torch.arange(2 * 14).remainder(19).add(4).view(2, 14)
MASK = torch.ones(2, 14, dtype=torch.long).index_fill_(1, torch.tensor([0, 1, 2]), 0)


def _train(name: str, precision: str = "fp32") -> TrainSpec:
    return TrainSpec(precision=precision, attention="eager" if "gemma" in name else "sdpa")


def _prefix(name: str, precision: str = "fp32", **knobs: Any) -> PrefixModel:
    model = prepare_model(load_model(name), make_config("prefix", {"num_virtual_tokens": V, **knobs}),
                          _train(name, precision), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the default init is tiny for the projection path; make the prefix matter
        for p in model.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gpt2", "tiny-phi3",
                                  "tiny-mixtral", "tiny-gemma2"])
def test_shapes_and_finite_loss(name: str) -> None:
    spec = load_model(name)
    model = _prefix(name, "bf16")
    kv = model.prefix_key_values(2)
    assert len(kv) == spec.num_layers
    assert all(k.shape == v.shape == (2, spec.num_kv_heads, V, spec.head_dim) for k, v in kv)
    assert {k.dtype for k, _ in kv} == {torch.bfloat16}
    assert {p.dtype for p in model.prompt_encoder.parameters()} == {torch.float32}
    out = model(IDS, labels=IDS, attention_mask=MASK)
    assert out.logits.shape == (2, 14, spec.vocab_size)
    assert torch.isfinite(out.loss)


def test_token_dim_follows_peft_gqa_rule() -> None:
    assert token_dim(load_model("llama-3-8b")) == 128 * 8
    assert token_dim(load_model("llama-2-7b")) == 4096
    assert token_dim(load_model("gpt2")) == 768


def test_prefix_changes_the_output() -> None:
    model = _prefix("tiny-llama")
    base = build_model(load_model("tiny-llama"), _train("tiny-llama"), seed=0).eval()
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, base(input_ids=IDS).logits, atol=1e-3)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gpt2"])
@pytest.mark.parametrize("projection", [False, True])
def test_logits_equal_peft(name: str, projection: bool) -> None:
    ours = _prefix(name, prefix_projection=projection)
    twin = peft.get_peft_model(build_model(load_model(name), _train(name), seed=0),
                               peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=V,
                                                       prefix_projection=projection)).eval()
    twin.prompt_encoder["default"].load_state_dict(ours.prompt_encoder.state_dict())
    with torch.no_grad():
        for mask in (None, MASK):
            got = ours(IDS, attention_mask=mask).logits
            want = twin(input_ids=IDS, attention_mask=mask).logits
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_positions_shift_by_num_virtual_tokens(name: str) -> None:
    """The model sees positions V..V+T-1: the cache reports V past tokens and position_ids start at V."""
    model = _prefix(name)
    seen: dict[str, Any] = {}

    def grab(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen["position_ids"] = kwargs.get("position_ids")
        seen["past"] = kwargs["past_key_values"].get_seq_length()

    handle = model.model.base_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(IDS)
    handle.remove()
    assert seen["past"] == V
    assert seen["position_ids"][0].tolist() == list(range(V, V + IDS.shape[1]))


def test_checkpointing_keeps_the_prefix_and_its_gradients() -> None:
    """PEFT's DynamicCache prefix does not survive transformers' checkpointing; lorabench's read-only
    cache does: same loss and the same prefix gradient with and without checkpointing."""
    spec = load_model("tiny-qwen2")
    results = []
    for gc in (False, True):
        model = prepare_model(spec, make_config("prefix", {"num_virtual_tokens": V, "prefix_projection": True}),
                              TrainSpec(precision="fp32", gradient_checkpointing=gc), seed=0).train()
        out = model(IDS, labels=IDS)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad for p in model.prompt_encoder.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for g_plain, g_ckpt in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g_plain, g_ckpt)
