"""Tracing PEFT's own LoRA modules (--stack peft): the same bytes as lorabench's modules and the planner."""

from __future__ import annotations

import pytest

from lorabench.catalog import load_model
from lorabench.errors import UserError
from lorabench.memory.planner import predict
from lorabench.methods import make_config
from lorabench.specs import TrainSpec

pytest.importorskip("peft")


@pytest.mark.parametrize("tr", [dict(weights_dtype="bf16", autocast="bf16"),
                                dict(precision="bf16", gradient_checkpointing=True)])
def test_peft_lora_trace_equals_lorabench_trace_and_plan(tr: dict) -> None:
    from lorabench.runtime.trace import trace

    spec = load_model("tiny-llama")
    cfg = make_config("lora", {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"})
    train = TrainSpec(micro_batch_size=2, seq_len=64, **tr)
    peft, own = trace(spec, cfg, train, stack="peft"), trace(spec, cfg, train)
    assert peft.components["weights_trainable"] == own.components["weights_trainable"]
    assert abs(peft.peak_bytes - own.peak_bytes) <= 0.001 * own.peak_bytes
    if not train.gradient_checkpointing:  # (the planner on Qwen2.5-0.5B: tests/runtime/test_trace_accuracy.py)
        assert abs(predict(spec, cfg, train).peak_allocated_bytes - peft.peak_bytes) <= 0.03 * peft.peak_bytes


def test_peft_stack_is_lora_and_qlora_only() -> None:
    from lorabench.runtime.peft_stack import build_peft_model

    for method, knobs in (("ia3", {}), ("qlora", {"use_dora": True})):
        with pytest.raises(UserError, match="LoRA and QLoRA"):
            build_peft_model(load_model("tiny-llama"), make_config(method, knobs), TrainSpec())


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "tiny-gemma2", "tiny-gpt2"])
def test_cast_norms_casts_exactly_the_norms_the_planner_counts(model: str) -> None:
    import torch

    from lorabench.catalog import load_model
    from lorabench.runtime.build import build_model, cast_norms

    spec = load_model(model)
    hf = build_model(spec, TrainSpec(precision="bf16", attention="eager"), device="meta")
    assert cast_norms(hf, "fp32") == spec.params_by_kind()["norms"]
    fp32 = {n for n, p in hf.named_parameters() if p.dtype == torch.float32}
    assert sum(p.numel() for n, p in hf.named_parameters() if n in fp32) == spec.params_by_kind()["norms"]


def test_real_peft_qlora_is_loaded_in_4bit_as_transformers_does() -> None:
    """A real (not meta) PEFT-stack QLoRA: every linear but lm_head a quantized bitsandbytes Linear4bit whose
    weights dequantize to N(0, initializer_range), PEFT's adapters on top, trainable count = the planner's."""
    import torch

    from lorabench.quant.bnb_backend import import_bitsandbytes
    from lorabench.runtime.stacks import build_for_stack

    bnb = import_bitsandbytes()
    spec, cfg = load_model("tiny-gemma2"), make_config("qlora")
    train = TrainSpec(precision="bf16", attention="eager", stack="peft")
    model = build_for_stack(spec, cfg, train, device="cpu", seed=1)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == spec.num_layers * len(spec.quantized_matrices())
    weight = layers[0].weight
    assert weight.dtype == torch.uint8 and weight.device.type == "cpu" and weight.bnb_quantized
    std = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float().std().item()
    assert std == pytest.approx(0.02, rel=0.1)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == predict(spec, cfg, train).trainable_params
    ids = torch.randint(0, spec.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert abs(float(loss) - torch.log(torch.tensor(float(spec.vocab_size)))) < 0.5
