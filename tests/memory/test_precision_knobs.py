"""weights_dtype / autocast / prepare_kbit / loader: one meaning in the planner and the tracer."""

from __future__ import annotations

import pytest

from lorabench.catalog import load_model
from lorabench.memory.planner import predict
from lorabench.methods import make_config
from lorabench.specs import TrainSpec

LLAMA65 = load_model("65b")


@pytest.mark.parametrize("precision, weights, autocast", [
    ("fp32", "fp32", None), ("bf16-mixed", "fp32", "bf16"), ("fp16-mixed", "fp32", "fp16"), ("bf16", "bf16", None)])
def test_precision_is_shorthand_for_weights_and_autocast(precision: str, weights: str, autocast: str | None) -> None:
    short = TrainSpec(precision=precision)
    long = TrainSpec(weights_dtype=weights, autocast=autocast or "none")
    assert (short.param_dtype, short.autocast_dtype) == (long.param_dtype, long.autocast_dtype) == (weights, autocast)
    model, cfg = load_model("7b"), make_config("lora")
    assert predict(model, cfg, short).components == predict(model, cfg, long).components


def test_prepare_kbit_casts_the_non_quantized_weights_to_fp32() -> None:
    cfg = make_config("qlora")
    plain = predict(LLAMA65, cfg, TrainSpec(gradient_checkpointing=True))
    kbit = predict(LLAMA65, cfg, TrainSpec(gradient_checkpointing=True, prepare_kbit=True, autocast="bf16"))
    rest = LLAMA65.total_params - 80 * sum(m.weight_params for m in LLAMA65.quantized_matrices())
    assert plain.components["weights"] == 2 * rest and kbit.components["weights"] == 4 * rest
    assert kbit.components["quantized_weights"] == plain.components["quantized_weights"]


def test_load_phase_per_layer_vs_16bit_first() -> None:
    from lorabench.memory.load import quantize_scratch_bytes

    cfg = make_config("qlora")
    per_layer = predict(LLAMA65, cfg, TrainSpec(gradient_checkpointing=True))
    first = predict(LLAMA65, cfg, TrainSpec(gradient_checkpointing=True, loader="16bit-first"))
    biggest = max(m.weight_params for m in LLAMA65.quantized_matrices())
    assert per_layer.phase_peaks["load"] == (per_layer.state_bytes["weights"] + per_layer.state_bytes["quantized_weights"]
                                             + 2 * biggest + quantize_scratch_bytes(biggest, cfg, TrainSpec()))
    # 16-bit first: the whole model in bf16 (130 GB) is the peak and the verdict on a 48 GB card.
    assert first.phase == "load" and first.phase_peaks["load"] >= 2 * LLAMA65.total_params
    assert max(first.phase_peaks.values()) == first.phase_peaks["load"]


def test_autocast_over_16bit_weights_agrees_with_the_trace() -> None:
    pytest.importorskip("torch")
    from lorabench.runtime.trace import trace

    spec, cfg = load_model("tiny-llama"), make_config("lora", {"lora_dropout": 0.05, "target_modules": "all-linear"})
    train = TrainSpec(micro_batch_size=2, seq_len=64, weights_dtype="bf16", autocast="bf16")
    pred, traced = predict(spec, cfg, train), trace(spec, cfg, train)
    assert abs(pred.peak_allocated_bytes - traced.peak_bytes) <= 0.03 * traced.peak_bytes
