"""lorabench.quant.linear4bit: exact forward/backward, nothing weight-sized saved, state dicts, bnb."""

from __future__ import annotations

import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorabench.quant.linear4bit import Linear4bit, quantized_numel
from lorabench.quant.nf4 import NF4Tensor

IN, OUT = 256, 192


def _linear(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias)


def _reference(layer: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.to(layer.compute_dtype)
    return F.linear(x.to(layer.compute_dtype), layer.dequantize(), bias).to(x.dtype)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_and_grad_input_match_dense_reference(compute_dtype: torch.dtype, bias: bool,
                                                      double_quant: bool) -> None:  # fmt: skip
    layer = Linear4bit.from_linear(_linear(bias), double_quant=double_quant, compute_dtype=compute_dtype)
    x = torch.randn(2, 5, IN, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _reference(layer, x_ref)
    assert y.dtype == x.dtype and y.shape == (2, 5, OUT)
    assert torch.equal(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    assert layer.dequantize().dtype == compute_dtype
    assert layer.dequantize(torch.float32).shape == (OUT, IN)


def test_weight_is_frozen_and_not_a_parameter() -> None:
    layer = Linear4bit.from_linear(_linear(), compute_dtype=torch.float32)
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert not any(p.requires_grad for p in layer.parameters())
    assert isinstance(layer.weight, NF4Tensor) and layer.weight.requires_grad is False
    assert layer.weight.shape == (OUT, IN) and (layer.in_features, layer.out_features) == (IN, OUT)
    other = Linear4bit.from_linear(_linear(seed=1))
    assert quantized_numel(nn.Sequential(layer, other, nn.Linear(2, 3))) == 2 * IN * OUT
    x = torch.randn(3, IN, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    for t in [*layer.buffers(), *layer.parameters()]:
        assert t.grad is None and not t.requires_grad


def test_trainable_bias_gets_its_gradient() -> None:
    layer = Linear4bit.from_linear(_linear(), compute_dtype=torch.float32)
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 3, IN)
    layer(x).square().sum().backward()
    bias = layer.bias.detach().clone().requires_grad_(True)
    F.linear(x, layer.dequantize(), bias).square().sum().backward()
    torch.testing.assert_close(layer.bias.grad, bias.grad)


def _saved_during_forward(fn) -> list[torch.Tensor]:  # noqa: ANN001
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return saved


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nothing_weight_sized_is_saved_for_backward(compute_dtype: torch.dtype, double_quant: bool) -> None:
    layer = Linear4bit.from_linear(_linear(), double_quant=double_quant, compute_dtype=compute_dtype)
    layer.bias.requires_grad_(True)  # the most demanding case: input and bias gradients
    x = torch.randn(2, IN, dtype=torch.bfloat16, requires_grad=True)
    saved = _saved_during_forward(lambda: layer(x))
    limit = IN * OUT // 2
    big_float = [t for t in saved if t.is_floating_point() and t.numel() >= limit]
    assert big_float == [], [(tuple(t.shape), t.dtype) for t in big_float]
    assert x.grad is not None and layer.bias.grad is not None
    # Control: the same hooks do see a dense weight saved by an ordinary differentiable linear.
    dense = layer.dequantize().requires_grad_(False)
    control = _saved_during_forward(lambda: F.linear(x.to(compute_dtype), dense))
    assert any(t.numel() >= limit for t in control)


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip(double_quant: bool) -> None:
    layer = Linear4bit.from_linear(_linear(seed=1), double_quant=double_quant)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = Linear4bit.from_linear(_linear(seed=2), double_quant=double_quant)
    result = other.load_state_dict(torch.load(buf))
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    assert torch.equal(other(x), layer(x))
    assert other.weight.nbytes == layer.weight.nbytes
    with pytest.raises(RuntimeError, match="weight"):
        other.load_state_dict({"bias": layer.bias})


def test_dtype_casts_keep_quantization_constants() -> None:
    layer = Linear4bit.from_linear(_linear(), double_quant=False, compute_dtype=torch.float32)
    x = torch.randn(2, IN)
    before = layer(x)
    layer.to(torch.float16)
    assert layer.weight_absmax.dtype == torch.float32 and layer.bias.dtype == torch.float16
    assert torch.allclose(layer(x), before, atol=1e-2)
    layer.float()
    assert torch.equal(layer.weight.dequantize(torch.float32), layer.dequantize(torch.float32))


def test_runs_under_fake_tensor_mode_and_keeps_real_cache_clean() -> None:
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from lorabench.quant.nf4 import quantize_nf4
    from lorabench.quant.sizes import nf4_storage_bytes

    with FakeTensorMode():  # how lorabench traces a training step without allocating memory
        weight = quantize_nf4(torch.empty(OUT, IN, dtype=torch.bfloat16))
        assert isinstance(weight.packed, FakeTensor) and weight.nbytes == nf4_storage_bytes(OUT * IN)
        layer = Linear4bit(weight, torch.empty(OUT), compute_dtype=torch.bfloat16)
        x = torch.empty(3, IN, dtype=torch.bfloat16, requires_grad=True)
        layer(x).sum().backward()
        assert isinstance(x.grad, FakeTensor) and x.grad.shape == (3, IN)
    real = Linear4bit.from_linear(_linear())
    x = torch.randn(2, IN)
    assert torch.equal(real(x), _reference(real, x))


@pytest.fixture(scope="module")
def bnb_backend():  # noqa: ANN201
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    pytest.importorskip("bitsandbytes")
    from lorabench.quant import bnb_backend

    return bnb_backend


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_backend_forward_and_backward_close(bnb_backend, compute_dtype: torch.dtype,  # noqa: ANN001
                                                double_quant: bool) -> None:  # fmt: skip
    linear = _linear()
    ours = Linear4bit.from_linear(linear, double_quant=double_quant, compute_dtype=compute_dtype)
    same = bnb_backend.bnb_linear4bit_from_lorabench(ours)  # identical quantized weight
    own = bnb_backend.bnb_linear4bit_from_linear(linear, double_quant, compute_dtype)  # bnb quantizes
    tol = dict(rtol=1e-2, atol=1e-2) if compute_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    x = torch.randn(4, IN, dtype=compute_dtype)
    with torch.no_grad():
        y = ours(x)
        torch.testing.assert_close(same(x), y, **tol)
        # bnb's own quantizer: same codes; with double quant a few absmax codes may differ by a step
        torch.testing.assert_close(own(x), y, **(dict(rtol=2e-2, atol=2e-2) if double_quant else tol))
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    for module, xi in zip((ours, same), xs):
        module(xi).square().sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, **{k: 4 * v for k, v in tol.items()})


def test_bnb_eval_forward_takes_the_training_path_on_every_cpu(bnb_backend) -> None:  # noqa: ANN001
    """bitsandbytes 0.50 repacks a Linear4bit's weight in place for its AVX512-BF16 CPU kernel on the first
    eval-mode forward without grad, and asserts ``out_features % 32 == 0`` there; the backend turns that off
    (``keep_bitsandbytes_layout``), so 176 outputs (tiny-llama's MLP) work and the weight bytes never change.
    The flag check fails on every CPU without the fix; the forward checks fail on CPUs with AVX512-BF16."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 176).to(torch.bfloat16)
    ours = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for layer in (bnb_backend.bnb_linear4bit_from_linear(linear), bnb_backend.bnb_linear4bit_from_lorabench(ours)):
        assert layer.support_avx512bf16_for_cpu is False
        before = layer.weight.data.clone()
        with torch.no_grad():
            training_path = layer(x)
            layer.eval()
            eval_path = layer(x)
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(layer.weight.data, before) and torch.equal(eval_path, training_path)


def test_bnb_state_dict_loads_into_lorabench(bnb_backend) -> None:  # noqa: ANN001
    linear = _linear(seed=3)
    theirs = bnb_backend.bnb_linear4bit_from_linear(linear, double_quant=True, compute_dtype=torch.float32)
    ours = Linear4bit.from_linear(_linear(seed=4), double_quant=True, compute_dtype=torch.float32)
    result = ours.load_state_dict(theirs.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(5, IN)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_backward_match_cpu() -> None:
    layer = Linear4bit.from_linear(_linear(), compute_dtype=torch.float32)
    x = torch.randn(4, IN, requires_grad=True)
    layer(x).square().sum().backward()
    gpu = Linear4bit.from_linear(_linear().cuda(), compute_dtype=torch.float32)
    assert gpu.weight.device.type == "cuda" and gpu.weight.nbytes == layer.weight.nbytes
    assert torch.equal(layer.weight.packed, gpu.weight.packed.cpu())
    xg = x.detach().cuda().requires_grad_(True)
    yg = gpu(xg)
    yg.square().sum().backward()
    torch.testing.assert_close(yg.cpu(), layer(x), rtol=2e-2, atol=2e-2)  # absmax codes may differ
    torch.testing.assert_close(xg.grad.cpu(), x.grad, rtol=2e-2, atol=2e-2)
    same = Linear4bit(layer.weight.to("cuda"), layer.bias.cuda(), compute_dtype=torch.float32)
    torch.testing.assert_close(same(x.detach().cuda()).cpu(), layer(x), rtol=1e-4, atol=1e-4)
    moved = layer.to("cuda")
    assert moved.weight.device.type == "cuda" and moved.weight_absmax.dtype == torch.uint8
