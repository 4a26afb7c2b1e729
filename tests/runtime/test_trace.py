"""The fake-tensor tracer: identical to real CPU tensors on tiny models, exact on a full-size 7B."""

from __future__ import annotations

import json
import resource
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from lorabench.architectures import spec_from_hf_config  # noqa: E402
from lorabench.catalog import load_model  # noqa: E402
from lorabench.cli import main  # noqa: E402
from lorabench.errors import UserError  # noqa: E402
from lorabench.memory.categories import TRACE_CATEGORIES  # noqa: E402
from lorabench.methods import make_config  # noqa: E402
from lorabench.runtime.trace import by_module, peak_tensors, trace  # noqa: E402
from lorabench.specs import OptimizerSpec, TrainSpec  # noqa: E402

LLAMA2_7B_PARAMS = 6_738_415_616
LLAMA2_7B_PARAM_TENSORS = 32 * 9 + 3  # per layer 7 linears + 2 norms; embeddings, final norm, lm_head


def _train(method: str, **kw: object) -> TrainSpec:
    base: dict[str, object] = {"micro_batch_size": 2, "seq_len": 32,
                               "precision": "bf16-mixed" if method == "full" else "bf16"}
    base.update(kw)
    return TrainSpec(**base)  # type: ignore[arg-type]


# (model, method, TrainSpec overrides): every method on Llama, the others on GPT-2 (Conv1D, tied
# embeddings, dropout) and Qwen2 (qkv bias), plus checkpointing, eager attention, fp32 and 8-bit Adam.
REAL_VS_FAKE = [
    ("tiny-llama", "full", {}),
    ("tiny-llama", "lora", {}),
    ("tiny-llama", "qlora", {}),
    ("tiny-llama", "prefix", {}),
    ("tiny-llama", "adapters", {}),
    ("tiny-llama", "ia3", {}),
    ("tiny-llama", "lora", {"gradient_checkpointing": True}),
    ("tiny-llama", "qlora", {"gradient_checkpointing": True}),
    ("tiny-llama", "full", {"attention": "eager", "precision": "fp32"}),
    ("tiny-llama", "full", {"optimizer": OptimizerSpec("adamw_8bit"), "precision": "bf16"}),
    ("tiny-gpt2", "full", {}),
    ("tiny-gpt2", "lora", {}),
    ("tiny-gpt2", "qlora", {}),
    ("tiny-gpt2", "prefix", {"gradient_checkpointing": True}),
    ("tiny-qwen2", "full", {"precision": "bf16"}),
    ("tiny-qwen2", "lora", {"precision": "bf16-mixed"}),
    ("tiny-qwen2", "adapters", {}),
    ("tiny-qwen2", "ia3", {"gradient_checkpointing": True}),
]


@pytest.mark.parametrize("model, method, overrides", REAL_VS_FAKE,
                         ids=[f"{m}-{me}-{'-'.join(map(str, o.values())) or 'default'}" for m, me, o in REAL_VS_FAKE])
def test_fake_equals_real(model: str, method: str, overrides: dict[str, object]) -> None:
    spec, cfg, train = load_model(model), make_config(method), _train(method, **overrides)
    fake = trace(spec, cfg, train)
    real = trace(spec, cfg, train, fake=False)
    assert (fake.peak_bytes, fake.phase, fake.components) == (real.peak_bytes, real.phase, real.components)
    assert sum(fake.components.values()) == fake.peak_bytes
    assert set(fake.components) == set(TRACE_CATEGORIES)
    assert fake.components["activations"] > 0


def test_nf4_two_chunk_shortcut_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trace dequantizes two chunks per weight; real tensors run all 64 (CHUNK_ELEMS lowered)."""
    import lorabench.quant.nf4 as nf4

    monkeypatch.setattr(nf4, "CHUNK_ELEMS", 4096)
    cfg = dict(load_model("tiny-llama").hf_config)
    cfg.update(vocab_size=32, hidden_size=256, intermediate_size=1024, num_hidden_layers=1)
    spec = spec_from_hf_config(cfg, "wide-llama")  # MLP weights 256 x 1024 = 64 chunks of 4096
    train = TrainSpec(micro_batch_size=1, seq_len=16, precision="bf16")
    cfg = make_config("qlora", {"dequant": "torch"})  # the chunked pure-torch dequantization
    fake = trace(spec, cfg, train, keep_storages=True)
    real = trace(spec, cfg, train, fake=False)
    assert (fake.peak_bytes, fake.phase, fake.components) == (real.peak_bytes, real.phase, real.components)
    # the peak falls inside a dequantization (the fresh bf16 output is the largest activation)
    top = fake.peak_storages[0]
    assert top.category == "activations" and top.nbytes == 256 * 1024 * 2


@pytest.mark.parametrize("method, ckpt", [("full", False), ("qlora", True), ("prefix", False)])
def test_warm_start_gives_the_same_peak_as_full_steps(method: str, ckpt: bool) -> None:
    spec, cfg, train = load_model("tiny-llama"), make_config(method), _train(method, gradient_checkpointing=ckpt)
    warm = trace(spec, cfg, train)
    full = trace(spec, cfg, train, warm_start=False)
    assert (warm.peak_bytes, warm.phase, warm.components) == (full.peak_bytes, full.phase, full.components)


def test_llama2_7b_full_finetune_exact_state_bytes() -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    result = trace(load_model("llama-2-7b"), make_config("full"), TrainSpec(micro_batch_size=1, seq_len=512,
                                                                             precision="bf16"))
    seconds = time.perf_counter() - start
    param_bytes = 2 * LLAMA2_7B_PARAMS
    comps = result.components
    assert comps["weights_trainable"] == param_bytes
    assert comps["gradients"] == param_bytes                 # the peak is in the optimizer step
    assert comps["optimizer"] == 2 * param_bytes + 4 * LLAMA2_7B_PARAM_TENSORS  # m, v + a fp32 step each
    assert result.phase == "optimizer"
    # foreach AdamW's exp_avg_sq.sqrt() temporary (one state's worth) + the int64 input ids
    assert comps["activations"] == param_bytes + 512 * 8
    assert comps["weights_frozen"] == 2 * 64 * 4          # rotary inv_freq buffers (fp32)
    assert result.peak_bytes == sum(comps.values())
    assert seconds < 60, f"7B full trace took {seconds:.1f} s"
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert rss_growth < 2 * 1024**3, "the trace must not allocate the model"


def test_llama2_7b_full_finetune_mixed_precision_keeps_fp32_weights() -> None:
    result = trace(load_model("llama-2-7b"), make_config("full"), TrainSpec(micro_batch_size=1, seq_len=256,
                                                                             precision="bf16-mixed"))
    assert result.components["weights_trainable"] == 4 * LLAMA2_7B_PARAMS
    assert result.components["optimizer"] == 2 * 4 * LLAMA2_7B_PARAMS + 4 * LLAMA2_7B_PARAM_TENSORS


def test_peak_tensors_sum_to_the_activations() -> None:
    spec, cfg = load_model("tiny-llama"), make_config("lora")
    train = TrainSpec(micro_batch_size=1, seq_len=64, precision="bf16")
    rows = peak_tensors(spec, cfg, train)
    assert sum(r.nbytes for r in rows) == trace(spec, cfg, train).components["activations"]
    assert [r.nbytes for r in rows] == sorted((r.nbytes for r in rows), reverse=True)
    assert all(r.category == "activations" for r in rows)
    modules = by_module(rows)
    assert sum(modules.values()) == sum(r.nbytes for r in rows)
    assert any(key.startswith("model.layers.*.") for key in modules)  # layer indices folded


def test_cli_trace_json_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "--model", "tiny-llama", "--method", "lora", "--seq-len", "64", "--format", "json",
                 "--top", "3", "--by-module"]) == 0
    doc = json.loads(capsys.readouterr().out)
    expected = trace(load_model("tiny-llama"), make_config("lora"), TrainSpec(seq_len=64, precision="bf16"))
    assert doc["traced"]["peak_bytes"] == expected.peak_bytes
    assert doc["traced"]["components"] == expected.components
    assert [r["category"] for r in doc["rows"]] == [*TRACE_CATEGORIES, "peak (allocated)"]
    assert len(doc["peak_tensors"]) == 3
    assert main(["trace", "--model", "tiny-gpt2", "--method", "ia3", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "diff %" in out and "traced peak in" in out and "note:" in out


@pytest.mark.parametrize("argv", [
    ["--model", "tiny-llama", "--method", "qlora", "--backend", "bitsandbytes"],  # bnb layers cannot be meta
    ["--model", "tiny-llama", "--method", "lora", "--gpus", "2", "--sharding", "zero3"],
])
def test_cli_trace_refuses_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorabench: error:") and "\n" not in err


def test_gemma2_traces_with_eager_attention() -> None:
    spec, cfg = load_model("tiny-gemma2"), make_config("lora")
    train = TrainSpec(micro_batch_size=1, seq_len=16, precision="bf16", attention="eager")
    fake, real = trace(spec, cfg, train), trace(spec, cfg, train, fake=False)
    assert (fake.peak_bytes, fake.components) == (real.peak_bytes, real.components)
    with pytest.raises(UserError, match="sdpa"):
        trace(spec, cfg, TrainSpec(seq_len=16, precision="bf16", attention="sdpa"))
