"""The Triton NF4 dequantization kernel: the same values as lorabench's pure-torch dequantization.

``lorabench.quant.nf4.dequantize_nf4`` is bit-identical to bitsandbytes (tests/quant/test_nf4.py), so equality
with it is equality with bitsandbytes. Without a GPU the kernel runs in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set per test by the ``interpreter`` fixture). Known interpreter quirk: its
float32 -> bfloat16 cast truncates toward zero where the GPU rounds to nearest, so bf16 outputs are compared
bit for bit with the TRUNCATED fp32 reference and allowed one bf16 ulp against the rounded one; fp32 and fp16
outputs are compared exactly. On CUDA (marker ``gpu``) every dtype must be bit-identical.
"""

from __future__ import annotations

import pytest
import torch

from lorabench.quant import triton_nf4
from lorabench.quant.linear4bit import Linear4bit, dequant_as_on_cuda, resolve_dequant
from lorabench.quant.nf4 import dequantize_nf4, quantize_nf4

pytest.importorskip("triton")
pytestmark = pytest.mark.triton


CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture
def interpreter() -> None:
    """Kernels run on CUDA, or on CPU tensors in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
    if not triton_nf4.can_run_on(DEVICE):
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set before triton's import")


def _truncated_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by dropping the low 16 bits (what the interpreter's cast does)."""
    return (x.float().contiguous().view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)


def _weight(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    w = torch.randn(*shape) * 0.05
    w.view(-1)[:64] = 0.0  # an all-zero block (absmax 0)
    return w


# Odd element counts, a partial last block and partial nested (256-block) groups included.
SHAPES = [(33, 37), (96, 160), (7, 128)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_fp32_and_fp16_outputs_equal_the_torch_dequantization(interpreter: None, shape: tuple[int, int],
                                                              double_quant: bool, blocksize: int) -> None:
    q = quantize_nf4(_weight(shape).to(DEVICE), blocksize=blocksize, double_quant=double_quant)
    for dtype in (torch.float32, torch.float16):
        got = triton_nf4.dequantize_nf4_triton(q, dtype)
        assert got.dtype == dtype and got.shape == shape
        assert torch.equal(got, dequantize_nf4(q, dtype))


@pytest.mark.parametrize("double_quant", [True, False])
def test_bf16_output_within_one_ulp_and_equal_to_the_truncated_reference(interpreter: None,
                                                                         double_quant: bool) -> None:
    q = quantize_nf4(_weight((96, 160), seed=1).to(DEVICE), double_quant=double_quant)
    got = triton_nf4.dequantize_nf4_triton(q, torch.bfloat16)
    if CUDA:  # the GPU rounds to nearest, as torch does
        assert torch.equal(got, dequantize_nf4(q, torch.bfloat16))
        return
    ref32 = dequantize_nf4(q, torch.float32)
    assert torch.equal(got.view(torch.int16), _truncated_bf16(ref32).view(torch.int16))
    rounded = dequantize_nf4(q, torch.bfloat16)
    ulp_apart = (got.view(torch.int16).int() - rounded.view(torch.int16).int()).abs()
    assert int(ulp_apart.max()) <= 1 and bool((ulp_apart == 1).any())  # the quirk is real, and at most 1 ulp


def test_the_dispatcher_op_and_its_fake_kernel(interpreter: None) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = quantize_nf4(_weight((40, 64)).to(DEVICE))
    assert torch.equal(triton_nf4.dequantize_op(q, torch.float32), dequantize_nf4(q, torch.float32))
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = triton_nf4.dequantize_op(quantize_nf4(torch.empty(40, 64)), torch.bfloat16)
    assert out.shape == (40, 64) and out.dtype == torch.bfloat16


def test_4bit_layer_forward_and_backward_match_the_torch_path(interpreter: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import lorabench.quant.linear4bit as linear4bit

    if not CUDA:  # the dispatcher op computes with torch on the CPU: put the interpreted kernel in its place
        monkeypatch.setattr(linear4bit, "dequantize_op", triton_nf4.dequantize_nf4_triton)
    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 96, device=DEVICE)
    layers = {d: Linear4bit.from_linear(dense, compute_dtype=torch.float32, dequant=d) for d in ("torch", "triton")}
    x = torch.randn(3, 128, device=DEVICE)
    outs, grads = {}, {}
    for name, layer in layers.items():
        xi = x.clone().requires_grad_(True)
        outs[name] = layer(xi)
        outs[name].square().sum().backward()
        grads[name] = xi.grad
    assert torch.equal(outs["torch"], outs["triton"]) and torch.equal(grads["torch"], grads["triton"])


def test_auto_resolves_by_device_and_follows_the_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read at call time: CPU tensors now refused
    cpu = torch.device("cpu")
    assert resolve_dequant("auto", cpu) == "torch"
    assert resolve_dequant("auto", torch.device("cuda")) == "triton"
    assert resolve_dequant("torch", torch.device("cuda")) == "torch"
    with dequant_as_on_cuda():
        assert resolve_dequant("auto", cpu) == "triton"
    assert not triton_nf4.can_run_on(cpu)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_nf4.dequantize_nf4_triton(quantize_nf4(torch.randn(8, 64)), torch.float32)
    with pytest.raises(ValueError, match="dequant"):
        Linear4bit.from_linear(torch.nn.Linear(64, 8), dequant="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [True, False])
def test_cuda_kernel_is_bit_identical_in_every_dtype(double_quant: bool) -> None:
    q = quantize_nf4(_weight((1000, 1030)).cuda(), double_quant=double_quant)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(triton_nf4.dequantize_nf4_triton(q, dtype), dequantize_nf4(q, dtype))
