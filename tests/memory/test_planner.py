"""Planner invariants: exact static terms, sharding, solvers, monotonicity, and the seed article's anchors."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lorabench.catalog import load_gpu, load_model
from lorabench.memory.planner import fits, max_micro_batch, max_seq_len, predict
from lorabench.methods import METHOD_NAMES, make_config
from lorabench.quant.sizes import nf4_storage_bytes
from lorabench.specs import OptimizerSpec, TrainSpec

GiB = 1024**3
LLAMA7 = load_model("7b")


def test_full_static_terms_are_exact() -> None:
    p = predict(LLAMA7, make_config("full"), TrainSpec(precision="bf16-mixed"))
    n = LLAMA7.total_params
    assert p.components["trainable"] == 4 * n
    assert p.components["optimizer"] == 8 * n
    assert p.phase == "optimizer" and p.components["gradients"] == 4 * n


def test_qlora_quantized_bytes_match_quant_sizes() -> None:
    p = predict(LLAMA7, make_config("qlora"), TrainSpec())
    per_layer = sum(nf4_storage_bytes(m.in_features * m.out_features) for m in LLAMA7.matrices)
    assert p.components["quantized_weights"] == 32 * per_layer
    quantized = 32 * sum(m.weight_params for m in LLAMA7.matrices)
    assert p.components["weights"] == 2 * (LLAMA7.total_params - quantized)
    no_dq = predict(LLAMA7, make_config("qlora", {"double_quant": False}), TrainSpec())
    assert no_dq.components["quantized_weights"] > p.components["quantized_weights"]


@pytest.mark.parametrize("sharding, divided", [
    ("zero1", {"optimizer"}),  # ZeroRedundancyOptimizer
    ("zero2", {"optimizer", "gradients", "trainable"}),  # FSDP2 stores 1/N shards of the params too
    ("zero3", {"optimizer", "gradients", "trainable"}),
])
def test_sharding_divides_the_right_terms(sharding: str, divided: set[str]) -> None:
    one = predict(LLAMA7, make_config("full"), TrainSpec(precision="bf16-mixed"))
    eight = predict(LLAMA7, make_config("full"), TrainSpec(precision="bf16-mixed", num_gpus=8, sharding=sharding))
    for name in ("optimizer", "gradients", "trainable"):
        if name in divided and sharding == "zero1":  # whole tensors per rank: the largest share, near 1/8
            assert one.state_bytes[name] / 8 <= eight.state_bytes[name] < 1.02 * one.state_bytes[name] / 8
        elif name in divided:
            assert eight.state_bytes[name] == -(-one.state_bytes[name] // 8)
        else:
            assert eight.state_bytes[name] == one.state_bytes[name]


def test_zero3_per_gpu_memory_keeps_shrinking_and_peft_frozen_weights_shard_too() -> None:
    """FSDP shards frozen base weights as well; PEFT optimizer states stay trainable-only; NF4 buffers
    are replicated (lorabench's Linear4bit keeps them as buffers)."""
    lora = make_config("lora")
    peaks = [predict(LLAMA7, lora, TrainSpec(num_gpus=n, sharding="zero3")).peak_allocated_bytes for n in (2, 4, 8)]
    assert peaks[0] > peaks[1] > peaks[2]
    two = predict(LLAMA7, lora, TrainSpec(num_gpus=2, sharding="zero3"))
    one = predict(LLAMA7, lora, TrainSpec())
    assert two.state_bytes["weights"] == -(-one.state_bytes["weights"] // 2)
    assert two.state_bytes["optimizer"] == -(-one.state_bytes["optimizer"] // 2) < 0.01 * one.state_bytes["weights"]
    q1, q2 = (predict(LLAMA7, make_config("qlora"), TrainSpec(num_gpus=n, sharding="zero3" if n > 1 else "none"))
              for n in (1, 2))
    assert q2.state_bytes["quantized_weights"] == q1.state_bytes["quantized_weights"]


def test_ddp_holds_one_more_copy_of_the_gradients_in_its_buckets() -> None:
    train = TrainSpec(precision="bf16-mixed")
    one = predict(LLAMA7, make_config("full"), train)
    ddp = predict(LLAMA7, make_config("full"), replace(train, num_gpus=8))
    assert ddp.components["gradients"] == one.components["gradients"] + 4 * LLAMA7.total_params


def test_grad_accumulation_does_not_change_memory() -> None:
    a = predict(LLAMA7, make_config("lora"), TrainSpec())
    b = predict(LLAMA7, make_config("lora"), TrainSpec(grad_accum_steps=16))
    assert a.components == b.components


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_memory_grows_with_batch_and_seq(method: str) -> None:
    base = TrainSpec(precision="bf16-mixed" if method == "full" else "bf16")
    cfg = make_config(method)
    p1 = predict(LLAMA7, cfg, base).phase_peaks["backward"]
    assert predict(LLAMA7, cfg, replace(base, micro_batch_size=4)).phase_peaks["backward"] > p1
    assert predict(LLAMA7, cfg, replace(base, seq_len=2048)).phase_peaks["backward"] > p1


def test_checkpointing_reduces_activations() -> None:
    cfg = make_config("lora")
    off = predict(LLAMA7, cfg, TrainSpec(seq_len=2048, micro_batch_size=4))
    on = predict(LLAMA7, cfg, TrainSpec(seq_len=2048, micro_batch_size=4, gradient_checkpointing=True))
    assert on.components["activations"] < off.components["activations"] / 3


def test_optimizer_variants() -> None:
    cfg = make_config("full")
    adam = predict(LLAMA7, cfg, TrainSpec(precision="bf16-mixed")).components["optimizer"]
    sgd = predict(LLAMA7, cfg, TrainSpec(precision="bf16-mixed", optimizer=OptimizerSpec("sgd"))).components["optimizer"]
    mom = predict(LLAMA7, cfg, TrainSpec(precision="bf16-mixed", optimizer=OptimizerSpec("sgd_momentum")))
    eight = predict(LLAMA7, cfg, TrainSpec(precision="bf16-mixed", optimizer=OptimizerSpec("adamw_8bit")))
    assert sgd == 0 and mom.components["optimizer"] == adam // 2
    assert eight.components["optimizer"] < adam / 3
    paged = predict(LLAMA7, cfg, TrainSpec(precision="bf16-mixed", optimizer=OptimizerSpec("paged_adamw")))
    assert paged.host_bytes == paged.components["optimizer"] > 0


def test_solvers_agree_with_fits() -> None:
    gpu = load_gpu("a100-40gb")
    cfg, train = make_config("qlora"), TrainSpec(seq_len=1024)
    b = max_micro_batch(LLAMA7, cfg, train, gpu)
    assert b >= 1
    assert fits(predict(LLAMA7, cfg, replace(train, micro_batch_size=b), gpu), gpu).fits
    assert not fits(predict(LLAMA7, cfg, replace(train, micro_batch_size=b + 1), gpu), gpu).fits
    s = max_seq_len(LLAMA7, cfg, TrainSpec(), gpu)
    assert s == LLAMA7.max_position_embeddings or not fits(predict(LLAMA7, cfg, TrainSpec(seq_len=s + 1), gpu), gpu).fits


def test_seed_article_anchors() -> None:
    """README documents these settings; the anchors are the field's rough figures for a 7B model."""
    train = TrainSpec(micro_batch_size=1, seq_len=512)
    full = predict(LLAMA7, make_config("full"), replace(train, precision="bf16-mixed"))
    lora = predict(LLAMA7, make_config("lora"), train)
    qlora = predict(LLAMA7, make_config("qlora"), replace(train, gradient_checkpointing=True))
    static_full = sum(full.components[k] for k in ("trainable", "gradients", "optimizer"))
    assert 100e9 < static_full < 115e9  # 16 bytes/param: the seed's ~112 GB
    assert 14e9 < lora.device_bytes < 20e9  # ~16 GB
    assert 4e9 < qlora.device_bytes < 8e9  # ~6 GB
    h100, a6000 = load_gpu("h100"), 48 * GiB
    q70 = predict(load_model("70b"), make_config("qlora"), replace(train, gradient_checkpointing=True), h100)
    assert fits(q70, h100).fits
    q65 = predict(load_model("70b"), make_config("qlora"), replace(train, gradient_checkpointing=True))
    assert q65.device_bytes < a6000 * 1.0
