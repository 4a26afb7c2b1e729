"""bitsandbytes' own 4-bit layers under the tracer (lorabench.runtime.bnb_stack): real shapes, CUDA's ops."""

from __future__ import annotations

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from lorabench.catalog import load_model  # noqa: E402
from lorabench.methods import make_config  # noqa: E402
from lorabench.runtime import bnb_stack  # noqa: E402
from lorabench.specs import TrainSpec  # noqa: E402


def _layout(state):  # type: ignore[no-untyped-def]
    rows = []
    while state is not None:
        rows.append({k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v
                     for k, v in vars(state).items() if k in ("absmax", "code", "offset", "blocksize", "dtype")})
        state = getattr(state, "state2", None)
    return rows


@pytest.mark.parametrize("double_quant", [True, False])
def test_fake_quant_state_has_the_layout_of_a_real_quantization(double_quant: bool) -> None:
    import bitsandbytes.functional as F

    weight = torch.randn(384, 200, dtype=torch.bfloat16)  # 76800 values: 1200 blocks, 5 nested blocks
    packed, real = F.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    fake = bnb_stack.fake_quant_state(384, 200, double_quant=double_quant, dtype=torch.bfloat16)
    assert _layout(fake) == _layout(real)
    layer = bnb_stack.to_linear4bit(nn.Linear(200, 384), double_quant=double_quant, compute_dtype=torch.bfloat16,
                                    weight_dtype=torch.bfloat16)
    assert (tuple(layer.weight.shape), layer.weight.dtype) == (tuple(packed.shape), packed.dtype)


def test_peft_qlora_model_is_peft_over_bitsandbytes() -> None:
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    from lorabench.runtime.peft_stack import build_peft_model

    model = build_peft_model(load_model("tiny-llama"), make_config("qlora"), TrainSpec(prepare_kbit=True))
    wrapped = [m for m in model.modules() if isinstance(m, PeftLinear4bit)]
    assert wrapped and all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in wrapped)
    assert all(type(m.get_base_layer().weight).__name__ == "Params4bit" for m in wrapped)
    # prepare_model_for_kbit_training: every other parameter in fp32
    assert {p.dtype for n, p in model.named_parameters() if p.dtype != torch.uint8} == {torch.float32}


@pytest.mark.parametrize("as_on_cuda", [True, False])
def test_training_forward_dequantizes_then_multiplies(as_on_cuda: bool) -> None:
    from lorabench.runtime.trace import to_fake
    from lorabench.runtime.tracker import MemoryTracker

    model = nn.Sequential(bnb_stack.to_linear4bit(nn.Linear(256, 512, bias=False), double_quant=True,
                                                  compute_dtype=torch.bfloat16, weight_dtype=torch.bfloat16))
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    states = bnb_stack.quant_states(model)
    to_fake(model, fake_mode)
    bnb_stack.reattach_quant_states(states, lambda t: fake_mode.fake_tensor_converter.from_meta_and_device(
        fake_mode, t, "cpu"))
    x = fake_mode.from_tensor(torch.empty(2048, 256, dtype=torch.bfloat16)).requires_grad_()
    tracker = MemoryTracker()
    patch = bnb_stack.matmul_4bit_as_on_cuda() if as_on_cuda else torch.autograd.grad_mode.enable_grad()
    with fake_mode, patch, tracker.active():
        out = model(x)
        forward_peak_bytes = tracker.peak_bytes
        out.sum().backward()
    tracker.close()
    out_bytes, weight_bytes = 2048 * 512 * 2, 512 * 256 * 2
    if as_on_cuda:  # the dequantized weight (and its fp32 absmax) beside the output
        assert forward_peak_bytes >= out_bytes + weight_bytes
    else:  # bitsandbytes' fake fused GEMM: the output only
        assert out_bytes <= forward_peak_bytes < out_bytes + weight_bytes
    assert tracker.peak_bytes >= out_bytes + weight_bytes  # backward re-dequantizes (bitsandbytes' own)
    assert x.grad is not None and x.grad.shape == x.shape
