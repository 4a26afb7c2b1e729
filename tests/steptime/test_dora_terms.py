"""DoRA's step-time terms (lorabench/methods/lora/dora_steptime.py) on a case computed by hand, and their
direction: slower than LoRA, more so with more weight per token; the added work grows with the rank."""

from __future__ import annotations

from dataclasses import replace

from lorabench.catalog import load_gpu, load_model
from lorabench.methods import make_config
from lorabench.methods.lora import steptime as lora_time
from lorabench.methods.qlora import steptime as qlora_time
from lorabench.specs import TrainSpec
from lorabench.steptime.model import predict_time

TINY = load_model("tiny-llama")  # default LoRA targets: q_proj 64 -> 64 and v_proj 64 -> 32, no bias, 2 layers
TRAIN = TrainSpec(micro_batch_size=2, seq_len=8, precision="bf16")  # T = 16, bf16 weights, fp32 adapters
H100 = load_gpu("h100")


def _extra(steptime, method: str, train: TrainSpec = TRAIN, **knobs):  # type: ignore[no-untyped-def]
    (lf, lb) = steptime.adapter_work(TINY, make_config(method, knobs), train)
    (df, db) = steptime.adapter_work(TINY, make_config(method, {**knobs, "use_dora": True}), train)
    return df.flops - lf.flops, df.bytes - lf.bytes, df.kernels - lf.kernels, db.flops - lb.flops, \
        db.bytes - lb.bytes, db.kernels - lb.kernels


def test_dora_work_by_hand() -> None:
    # q (i = o = 64, r = 8): norm 2*8*64*(64+64) + 3*4096 = 143360 FLOPs, rescaling 2*16*64 = 2048;
    # bytes: eye 2*64^2*4 = 32768, eye@A^T 2*64*8*4 = 4096, BA + s*BA + sum + norm 7*4096*4 = 114688,
    # W bf16 -> fp32 4096*(2+4) = 24576, tokens 16*64*(2+4) + 3*16*64*4 = 18432: 194560.
    # v (64 -> 32): 98304 + 6144 + 1024 = 105472 FLOPs; 32768 + 4096 + 57344 + 12288 + 9216 = 115712 bytes.
    # backward per target: 6 T o FLOPs, 12 T o * 4 + 3 T o * 2 = 54 T o bytes (o = 64 + 32).
    f_flops, f_bytes, f_k, b_flops, b_bytes, b_k = _extra(lora_time, "lora")
    assert (f_flops, f_bytes, f_k) == (2 * (145408 + 105472), 2 * (194560 + 115712), 2 * 2 * 18)
    assert (b_flops, b_bytes, b_k) == (2 * 6 * 16 * 96, 2 * 54 * 16 * 96, 2 * 2 * 13)


def test_no_dora_no_extra_work() -> None:
    assert lora_time.adapter_work(TINY, make_config("lora"), TRAIN) == lora_time.lora_work(TINY, make_config("lora"), TRAIN)
    assert qlora_time.extra_dequant_work(TINY, make_config("qlora"), TRAIN).bytes == 0


def test_qlora_dora_dequantizes_the_adapted_weights_again() -> None:
    cfg = make_config("qlora", {"use_dora": True, "target_modules": ("q_proj", "v_proj")})
    extra = qlora_time.extra_dequant_work(TINY, cfg, TRAIN)
    # triton/bnb kernel: 0.5 + 1/64 + 2 bytes per element of q (4096) and v (2048), 2 kernels each, 2 layers
    assert extra.bytes == 2 * (4096 + 2048) * (0.5 + 1 / 64 + 2)
    assert extra.kernels == 2 * 2 * 2
    # the weight reaches the norm dequantized in bf16, then cast to fp32: the same cast bytes as LoRA's
    assert _extra(qlora_time, "qlora", target_modules=("q_proj", "v_proj")) == _extra(lora_time, "lora")


def _times(model: str, method: str = "lora", train: TrainSpec | None = None, **knobs) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    m, spec = load_model(model), train or TrainSpec(micro_batch_size=1, seq_len=256)
    lora = predict_time(m, make_config(method, knobs), spec, H100).step_time_s
    dora = predict_time(m, make_config(method, {**knobs, "use_dora": True}), spec, H100).step_time_s
    return lora, dora


def _ratio(*args, **kwargs) -> float:  # type: ignore[no-untyped-def]
    lora, dora = _times(*args, **kwargs)
    return dora / lora


def test_dora_slower_more_so_with_more_weight_per_token() -> None:
    assert _ratio("7b") > 1 and _ratio("7b", "qlora") > 1
    few, many = TrainSpec(micro_batch_size=1, seq_len=256), TrainSpec(micro_batch_size=4, seq_len=2048)
    assert _ratio("7b", train=few) > _ratio("7b", train=many)
    assert _ratio("70b", train=few) > _ratio("7b", train=few)


def test_dora_extra_grows_with_rank() -> None:
    """The weight norm's B A (through eye(in)) is r-wide: its FLOPs, and DoRA's added time on a short
    sequence, grow with r (the ratio need not: LoRA's own r-wide path grows too)."""
    f8 = _extra(lora_time, "lora", r=8)[0]
    f64 = _extra(lora_time, "lora", r=64)[0]
    assert f64 - f8 == 2 * 2 * (64 - 8) * 64 * (128 + 96)  # 2 r in (in + out) per target, 2 layers
    lo8, do8 = _times("7b", r=8)
    lo256, do256 = _times("7b", r=256)
    assert do256 - lo256 > do8 - lo8
