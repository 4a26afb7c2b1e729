"""build_model / prepare_model: dtypes per precision, meta builds, checkpointing, trainable helpers."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lorabench.catalog import load_model  # noqa: E402
from lorabench.errors import UserError  # noqa: E402
from lorabench.methods import make_config  # noqa: E402
from lorabench.runtime.build import (build_model, count_trainable, decoder_layers, hf_model,  # noqa: E402
                                     prepare_model, trainable_parameters)
from lorabench.specs import TrainSpec  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: one thread is ~100x faster than two threads fighting other processes for 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PARAM_DTYPE = {"fp32": torch.float32, "bf16-mixed": torch.float32, "fp16-mixed": torch.float32,
               "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("precision", list(PARAM_DTYPE))
def test_build_dtype_and_cache(precision: str) -> None:
    model = build_model(load_model("tiny-llama"), TrainSpec(precision=precision))
    assert {p.dtype for p in model.parameters()} == {PARAM_DTYPE[precision]}
    assert model.config.use_cache is False
    assert model.config._attn_implementation == "sdpa"


def test_build_is_seeded_and_matches_spec_counts() -> None:
    spec = load_model("tiny-qwen2")
    a, b = build_model(spec, TrainSpec(), seed=3), build_model(spec, TrainSpec(), seed=3)
    c = build_model(spec, TrainSpec(), seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert sum(p.numel() for p in a.parameters()) == spec.total_params


def test_meta_build_is_fast_and_exact() -> None:
    spec = load_model("llama-2-7b")
    model = build_model(spec, TrainSpec(precision="bf16", attention="eager"), device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    assert model.config._attn_implementation == "eager"
    assert len(decoder_layers(model)) == 32


def test_gpt2_decoder_layers() -> None:
    model = build_model(load_model("tiny-gpt2"), TrainSpec(), device="meta")
    assert decoder_layers(model) is model.transformer.h


def test_gemma2_sdpa_is_a_user_error() -> None:
    with pytest.raises(UserError, match="attention eager"):
        build_model(load_model("tiny-gemma2"), TrainSpec(attention="sdpa"), device="meta")
    build_model(load_model("tiny-gemma2"), TrainSpec(attention="eager"), device="meta")


# (method, precision) -> (dtype of trainable params, dtype of frozen float params)
DTYPE_TABLE = {
    ("full", "bf16"): ({torch.bfloat16}, set()),
    ("full", "bf16-mixed"): ({torch.float32}, set()),
    ("lora", "bf16"): ({torch.float32}, {torch.bfloat16}),
    ("lora", "fp16"): ({torch.float32}, {torch.float16}),
    ("lora", "fp32"): ({torch.float32}, {torch.float32}),
    ("ia3", "bf16"): ({torch.float32}, {torch.bfloat16}),
    ("prefix", "bf16"): ({torch.float32}, {torch.bfloat16}),
    ("adapters", "bf16"): ({torch.float32}, {torch.bfloat16}),
    ("qlora", "bf16"): ({torch.float32}, {torch.bfloat16}),
    ("qlora", "fp32"): ({torch.float32}, {torch.float32, torch.bfloat16}),  # qkv biases in compute dtype
}


@pytest.mark.parametrize("method,precision", list(DTYPE_TABLE))
def test_prepare_dtypes(method: str, precision: str) -> None:
    model = prepare_model(load_model("tiny-qwen2"), make_config(method), TrainSpec(precision=precision),
                          device="meta")
    trainable, frozen = DTYPE_TABLE[(method, precision)]
    assert {p.dtype for p in model.parameters() if p.requires_grad} == trainable
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == frozen


def test_adapter_dtype_base_keeps_model_dtype() -> None:
    cfg = make_config("lora", {"adapter_dtype": "base"})
    model = prepare_model(load_model("tiny-llama"), cfg, TrainSpec(precision="bf16"), device="meta")
    assert {p.dtype for p in trainable_parameters(model)} == {torch.bfloat16}
    with pytest.raises(UserError):
        prepare_model(load_model("tiny-llama"), make_config("lora", {"adapter_dtype": "int4"}), TrainSpec(),
                      device="meta")


def test_trainable_helpers_count_tied_weights_once() -> None:
    spec = load_model("tiny-gpt2")  # tied lm_head
    model = prepare_model(spec, make_config("full"), TrainSpec(), device="meta")
    assert count_trainable(model) == spec.total_params
    assert len(trainable_parameters(model)) == len(list(model.parameters()))


@pytest.mark.parametrize("method", ["lora", "prefix", "adapters", "qlora"])
def test_checkpointing_non_reentrant_without_input_grad_hook(method: str) -> None:
    """Frozen embeddings + non-reentrant checkpointing: every trainable tensor still gets its gradient,
    equal to the gradient without checkpointing, and transformers' input-require-grads hook is removed."""
    spec = load_model("tiny-llama")
    grads = []
    for gc in (False, True):
        model = prepare_model(spec, make_config(method), TrainSpec(precision="fp32", gradient_checkpointing=gc))
        model.train()
        with torch.no_grad():  # make every adapter matter (B/up are zero at init)
            gen = torch.Generator().manual_seed(0)
            for p in trainable_parameters(model):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        hf = hf_model(model)
        flag = getattr(hf, "is_activation_checkpointing", None)
        assert (flag if flag is not None else hf.is_gradient_checkpointing) is gc
        assert not getattr(hf, "_require_grads_hooks", [])
        ids = torch.arange(24).remainder(7).view(2, 12)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in trainable_parameters(model)])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1])
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(plain, ckpt)
