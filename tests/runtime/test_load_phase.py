"""The planner's load phase (memory/load.py) against the live tensor bytes of real CPU builds.

Each build runs under the storage tracker (lorabench.runtime.tracker: tensor bytes, not RSS, which also holds
the interpreter and torch's libraries): QLoRA quantized per layer as it is built (lorabench's runtime, as
transformers' bitsandbytes quantizer does per checkpoint tensor), the 16-bit model materialized first and then
quantized, PEFT's own prepare_model_for_kbit_training (the fp32 cast, one parameter at a time), and the PEFT
stack: transformers' own bitsandbytes quantizer op (``Bnb4bitQuantize``: ``Params4bit(...).to(device)`` per
checkpoint tensor, bitsandbytes' ``quantize_4bit``) on a ``replace_with_bnb_linear`` skeleton, then
``get_peft_model``.
Qwen2.5-0.5B cut to 2 layers: its 152k x 896 tied embedding and the 4864-wide MLP matrices set the peaks.
"""

from __future__ import annotations

import pytest

from lorabench.architectures import spec_from_hf_config
from lorabench.catalog import load_model
from lorabench.memory.planner import predict
from lorabench.methods import get, make_config
from lorabench.specs import TrainSpec

pytest.importorskip("torch")
pytest.importorskip("transformers")

TOLERANCE = 0.01


def _qwen_2_layers():  # type: ignore[no-untyped-def]
    cfg = dict(load_model("qwen2.5-0.5b").hf_config)
    cfg["num_hidden_layers"] = 2
    return spec_from_hf_config(cfg, "qwen2.5-0.5b-2l")


def _tracked_build(build):  # type: ignore[no-untyped-def]
    from lorabench.runtime.tracker import MemoryTracker

    tracker = MemoryTracker()
    with tracker.active():
        model = build()
    tracker.close()
    return model, tracker.peak_bytes


def _checkpoint_order(spec, cfg, train):  # type: ignore[no-untyped-def]
    """Per-layer quantize-on-load in a checkpoint's order: the embedding (and norms) first, then each linear
    quantized right after it is materialized (lorabench's own builder does the linears first, a lower peak)."""
    from lorabench.methods.common import init_on_device
    from lorabench.methods.qlora.layer import quantized_paths
    from lorabench.runtime.build import build_model

    runtime = get("qlora").load_runtime()
    model = build_model(spec, train, device="meta")
    linears = {id(model.get_submodule(p)) for p in quantized_paths(model, spec)}
    init_on_device(model, "cpu", skip=lambda m: id(m) in linears)
    return runtime.apply(runtime.materialize(model, spec, cfg, train, device="cpu"), spec, cfg, train)


def _transformers_bnb_load(spec, cfg, train):  # type: ignore[no-untyped-def]
    """What ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))`` does with a
    checkpoint, tensor by tensor in the checkpoint's order: transformers' ``replace_with_bnb_linear`` skeleton on
    meta, each linear weight through the quantizer's own op (``Bnb4bitQuantize``), every other tensor as loaded; then the tie and
    ``get_peft_model`` (adapters in fp32, PEFT's ``autocast_adapter_dtype``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.auto import AutoHfQuantizer

    from lorabench.quant.bnb_backend import import_bitsandbytes
    from lorabench.runtime.build import build_model

    bnb = import_bitsandbytes()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=cfg.double_quant)
    model = replace_with_bnb_linear(build_model(spec, train, device="meta"), modules_to_not_convert=["lm_head"],
                                    quantization_config=quant)
    op = AutoHfQuantizer.from_config(quant).get_quantize_ops()  # transformers' own per-tensor op (Bnb4bitQuantize)
    for name, param in list(model.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        value = torch.empty(param.shape, dtype=torch.bfloat16).normal_(0.0, 0.02)  # the checkpoint tensor
        if isinstance(module, bnb.nn.Linear4bit) and leaf == "weight":
            setattr(module, leaf, op.convert({name: value}, model=model)[name])
        else:
            setattr(module, leaf, torch.nn.Parameter(value, requires_grad=False))
        del value
    model.tie_weights()
    return get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def test_peft_stack_load_phase_matches_transformers_bnb_quantizer() -> None:
    """The PEFT stack's load: bitsandbytes' quantizer (double-quant scratch only), not lorabench's chunks."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    spec, cfg = _qwen_2_layers(), make_config("qlora")
    train = TrainSpec(micro_batch_size=1, seq_len=64, weights_dtype="bf16", autocast="bf16", stack="peft")
    _, peak = _tracked_build(lambda: _transformers_bnb_load(spec, cfg, train))
    predicted = predict(spec, cfg, train).phase_peaks["load"]
    assert abs(predicted - peak) <= TOLERANCE * peak, f"predicted {predicted} vs tracked {peak} bytes"
    lorabench_quantizer = predict(spec, cfg, TrainSpec(**{**train.to_record(), "optimizer": train.optimizer,
                                                          "stack": "lorabench"})).phase_peaks["load"]
    assert lorabench_quantizer - peak > 5 * TOLERANCE * peak  # lorabench's 13-byte chunks are not what runs here


@pytest.mark.parametrize("loader", ["per-layer", "16bit-first", "lorabench-builder", "lorabench-builder-bnb"])
def test_load_phase_matches_a_tracked_build(loader: str) -> None:
    from lorabench.methods.common import init_on_device
    from lorabench.runtime.build import build_model, prepare_model

    if loader == "lorabench-builder-bnb":
        pytest.importorskip("bitsandbytes")
    spec = _qwen_2_layers()
    cfg = make_config("qlora", {"backend": "bitsandbytes"} if loader.endswith("-bnb") else {})
    train = TrainSpec(micro_batch_size=1, seq_len=64, weights_dtype="bf16", autocast="bf16",
                      loader="16bit-first" if loader == "16bit-first" else "per-layer")
    runtime = get("qlora").load_runtime()

    def build():  # type: ignore[no-untyped-def]
        if loader == "per-layer":
            return _checkpoint_order(spec, cfg, train)
        if loader.startswith("lorabench-builder"):
            return prepare_model(spec, cfg, train, device="cpu")
        # the whole model in bf16 first (materialized from meta, as from_pretrained loads it), then quantized
        return runtime.apply(init_on_device(build_model(spec, train, device="meta"), "cpu"), spec, cfg, train)

    _, peak = _tracked_build(build)
    predicted = predict(spec, cfg, train).phase_peaks["load"]
    assert abs(predicted - peak) <= TOLERANCE * peak, f"predicted {predicted} vs tracked {peak} bytes"


def test_load_phase_with_peft_prepare_kbit_cast_matches_a_tracked_build() -> None:
    pytest.importorskip("peft")
    from peft import prepare_model_for_kbit_training

    from lorabench.runtime.build import build_model

    spec, cfg = _qwen_2_layers(), make_config("qlora")
    train = TrainSpec(micro_batch_size=1, seq_len=64, weights_dtype="bf16", autocast="bf16", prepare_kbit=True,
                      gradient_checkpointing=True)
    runtime = get("qlora").load_runtime()
    bf16 = TrainSpec(micro_batch_size=1, seq_len=64, weights_dtype="bf16", autocast="bf16")

    def build():  # type: ignore[no-untyped-def]
        model = runtime.materialize(build_model(spec, bf16, device="meta"), spec, cfg, bf16, device="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return runtime.apply(model, spec, cfg, train)

    _, peak = _tracked_build(build)
    predicted = predict(spec, cfg, train).phase_peaks["load"]
    assert abs(predicted - peak) <= TOLERANCE * peak, f"predicted {predicted} vs tracked {peak} bytes"
