"""The step-time formulas on small cases computed by hand, and the directions the ratios must take."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lorabench.catalog import load_gpu, load_model
from lorabench.methods import make_config
from lorabench.specs import OptimizerSpec, TrainSpec
from lorabench.steptime import comm, terms
from lorabench.steptime.cost import TrainingBudget, cost_usd, summary
from lorabench.steptime.model import predict_time

TINY = load_model("tiny-llama")  # h=64, I=176, L=2, heads 4 (kv 2), d=16, V=256, untied
TRAIN = TrainSpec(micro_batch_size=2, seq_len=8, precision="bf16")
H100 = load_gpu("h100")


def test_tiny_llama_shapes_assumed_below() -> None:
    assert (TINY.hidden_size, TINY.intermediate_size, TINY.num_layers, TINY.num_heads, TINY.num_kv_heads,
            TINY.head_dim, TINY.vocab_size) == (64, 176, 2, 4, 2, 16, 256)


def test_dense_forward_flops_by_hand() -> None:
    # per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate/up/down 3 x 64x176 = 12288 + 33792 = 46080
    assert terms.layer_matmul_params(TINY) == 46080
    t = 16
    assert terms.dense_forward(TINY, TRAIN).flops == 2 * t * (2 * 46080 + 256 * 64)


def test_weight_grads_only_when_the_base_trains_and_input_grads_skip_layer0_inputs() -> None:
    assert terms.dense_weight_grad(TINY, TRAIN, trains_base=False).flops == 0
    fwd = terms.dense_forward(TINY, TRAIN).flops
    assert terms.dense_weight_grad(TINY, TRAIN, trains_base=True).flops == fwd
    # frozen embeddings: layer 0's q, k, v (64x64 + 2 x 64x32 = 8192 weights) need no input gradient
    assert terms.dense_input_grad(TINY, TRAIN, trains_base=False).flops == fwd - 2 * 16 * 8192
    assert terms.dense_input_grad(TINY, TRAIN, trains_base=True).flops == fwd


def test_attention_flops_causal_eager_and_prefix() -> None:
    b, s, nh, d, L = 2, 8, 4, 16, 2
    fwd, bwd = terms.attention(TINY, TRAIN, prefix_tokens=0)
    assert fwd.flops == 4 * b * nh * d * s * (s / 2) * L  # causal flash skips half the scores
    assert bwd.flops == 2.5 * fwd.flops
    eager, _ = terms.attention(TINY, replace(TRAIN, attention="eager"), prefix_tokens=0)
    assert eager.flops == 2 * fwd.flops and eager.bytes > fwd.bytes  # full s^2 plus the scores' traffic
    pre, _ = terms.attention(TINY, TRAIN, prefix_tokens=20)
    assert pre.flops == 4 * b * nh * d * s * (s + 20) * L  # a mask: no causal skipping


def test_optimizer_traffic_by_hand() -> None:
    adam = terms.optimizer_step(OptimizerSpec("adamw"), 1000, 4, 4, per_tensor_loop=False)
    assert adam.bytes == 1000 * 4 * 20 and adam.kernels == 8  # 20 passes, 8 foreach ops over 4 (< 48) tensors
    eight = terms.optimizer_step(OptimizerSpec("adamw_8bit"), 1000, 4, 4, per_tensor_loop=False)
    assert eight.bytes == pytest.approx(1000 * (3 * 4 + 4 + 8 / 256)) and eight.bytes < adam.bytes
    assert terms.optimizer_step(OptimizerSpec("sgd"), 1000, 4, 2, per_tensor_loop=False).bytes == 1000 * 2 * 3


def test_communication_volumes() -> None:
    g, w = 1e9, 4e9
    assert comm.communication_bytes(TrainSpec(num_gpus=1), g, w) == (0.0, 0)
    assert comm.communication_bytes(TrainSpec(num_gpus=4), g, w)[0] == pytest.approx(2 * 0.75 * g)  # ring all-reduce
    assert comm.communication_bytes(TrainSpec(num_gpus=4, sharding="zero2"), g, w)[0] == pytest.approx(2 * 0.75 * g)
    z3 = comm.communication_bytes(TrainSpec(num_gpus=4, sharding="zero3", grad_accum_steps=2), g, w)[0]
    assert z3 == pytest.approx(2 * (2 * 0.75 * w + 0.75 * g))


def _step(method: str, model=TINY, gpu=H100, knobs=None, **train) -> float:  # type: ignore[no-untyped-def]
    spec = replace(TRAIN, **train) if train else TRAIN
    return predict_time(model, make_config(method, knobs), spec, gpu).step_time_s


@pytest.mark.parametrize("model", ["tiny-llama", "7b"])
def test_ratio_directions(model: str) -> None:
    m = load_model(model)
    train = {"micro_batch_size": 4, "seq_len": 1024}
    lora_all = _step("lora", m, knobs={"target_modules": "all-linear"}, **train)
    assert _step("qlora", m, **train) > lora_all  # dequantization costs time
    assert _step("lora", m, gradient_checkpointing=True, **train) > _step("lora", m, **train)
    if m.total_params > 1e9:  # (on a 64-wide toy the fp32 adapter traffic outweighs the tiny weight gradients)
        assert _step("full", m, **train) > _step("lora", m, **train)  # weight grads + optimizer over all weights
    assert _step("lora", m, attention="eager", **train) > _step("lora", m, **train)


def test_more_gpus_more_tokens_per_s_and_nvlink_beats_pcie() -> None:
    m = load_model("7b")
    one = predict_time(m, make_config("full"), TrainSpec(micro_batch_size=4, seq_len=2048), H100)
    eight = predict_time(m, make_config("full"), TrainSpec(micro_batch_size=4, seq_len=2048, num_gpus=8,
                                                            sharding="zero3"), H100)
    assert eight.tokens_per_s > one.tokens_per_s and eight.components_s["communication"] > 0
    a6000 = load_gpu("a6000")
    spec2, spec4 = (TrainSpec(micro_batch_size=1, num_gpus=n, sharding="zero3") for n in (2, 4))
    c2 = predict_time(m, make_config("lora"), spec2, a6000).components_s["communication"]
    c4 = predict_time(m, make_config("lora"), spec4, a6000).components_s["communication"]
    assert c4 > 2 * c2  # beyond the NVLink pair the ring runs over PCIe (112.5 vs 64 GB/s, more volume)


def test_mfu_and_cost_arithmetic() -> None:
    step = predict_time(load_model("7b"), make_config("lora"), TrainSpec(micro_batch_size=4, seq_len=1024), H100)
    assert 0 < step.mfu < 1
    assert step.mfu == pytest.approx(step.model_flops_per_token * step.tokens_per_s / H100.bf16_flops_per_s)
    out = summary(step, TrainingBudget(tokens=1e9), H100)
    assert out["train_time_s"] == pytest.approx(1e9 / step.tokens_per_s)
    assert out["cost_usd"] == pytest.approx(out["train_time_s"] / 3600 * H100.usd_per_hour)
    assert cost_usd(7200, 2.0, 4) == 16.0
    assert TrainingBudget.from_flags(None, 5e8, 3, None).tokens == 1.5e9


def test_fused_adamw_moves_fewer_bytes_and_autocast_casts_wide_weights() -> None:
    fused = terms.optimizer_step(OptimizerSpec("adamw"), 1000, 4, 4, per_tensor_loop=False, impl="fused")
    assert fused.bytes == 1000 * 4 * 7 and fused.kernels == 1
    plain, _ = terms.layer_elementwise(TINY, TRAIN)
    mixed, _ = terms.layer_elementwise(TINY, replace(TRAIN, precision="bf16-mixed"))
    hf, _ = terms.layer_elementwise(TINY, replace(TRAIN, precision="bf16", weights_dtype="fp32", autocast="bf16"))
    assert mixed.bytes > plain.bytes and hf.bytes == mixed.bytes  # fp32 weights cast once per forward


def test_moe_model_flops_count_the_routed_experts_only() -> None:
    """Mixtral-8x7B: attention, router and top-2 of 8 experts per layer, plus the head (12.75B of 46.7B)."""
    from lorabench.catalog import load_model
    from lorabench.steptime.flops import matmul_params

    spec = load_model("mixtral")
    h, inter, kv = 4096, 14336, 1024
    per_layer = h * (h + kv + kv + h) + h * 8 + 2 * 3 * h * inter + 2 * h  # + the two norm weights
    assert matmul_params(spec) == 32 * per_layer + 32000 * h + h  # + lm_head and the final norm
