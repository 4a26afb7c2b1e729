"""lorabench.quant.nf4 against bitsandbytes' CPU backend (bit-exact) and bitsandbytes' error bounds."""

from __future__ import annotations

import io
import logging
from types import ModuleType
from typing import Iterator

import pytest
import torch

from lorabench.quant import nf4
from lorabench.quant.nf4 import NF4Tensor, dequantize_absmax, dequantize_nf4, quantize_nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(384, 256), (300, 77), (3, 7), (13,), (1,), (4097, 33), (2, 3, 65)]
LUT_STEP = 2 / 65535  # grid step of bitsandbytes' CPU 8-bit quantization lookup table


@pytest.fixture(scope="module")
def bnbf() -> ModuleType:
    """``bitsandbytes.functional`` with torch.compile off (its fallback ops compile per shape)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    return bnbf


@pytest.fixture(autouse=True)
def _no_dynamo() -> Iterator[None]:
    with torch._dynamo.config.patch(disable=True):
        yield


def _bnb_quantize(bnbf: ModuleType, w: torch.Tensor, double_quant: bool):  # noqa: ANN202
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    return packed.view(-1), state


def _bnb_state_for(bnbf: ModuleType, q: NF4Tensor, dtype: torch.dtype):  # noqa: ANN202
    """A bitsandbytes QuantState holding exactly lorabench's codes (to compare dequantization)."""
    code = bnbf.get_4bit_type("nf4", device="cpu")
    if not q.double_quant:
        return bnbf.QuantState(absmax=q.absmax, shape=q.shape, code=code, blocksize=q.blocksize,
                               quant_type="nf4", dtype=dtype)  # fmt: skip
    state2 = bnbf.QuantState(absmax=q.nested_absmax, code=bnbf.create_dynamic_map(signed=True),
                             blocksize=q.dq_blocksize, dtype=torch.float32)  # fmt: skip
    return bnbf.QuantState(absmax=q.absmax, shape=q.shape, code=code, blocksize=q.blocksize,
                           quant_type="nf4", dtype=dtype, offset=q.offset, state2=state2)  # fmt: skip


def _assert_dequant_matches_bnb(bnbf: ModuleType, q: NF4Tensor, dtype: torch.dtype) -> None:
    ours = dequantize_nf4(q, dtype)
    theirs = bnbf.dequantize_4bit(q.packed.view(-1, 1), _bnb_state_for(bnbf, q, dtype))
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours.reshape(-1), theirs.reshape(-1))


def test_constants_equal_bitsandbytes(bnbf: ModuleType) -> None:
    assert torch.equal(nf4.nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    for signed in (True, False):
        assert torch.equal(nf4.dynamic_map(signed), bnbf.create_dynamic_map(signed=signed))
    assert torch.equal(nf4.dynamic_map(True, 4, 8), bnbf.create_dynamic_map(True, 4, 8))
    dyn = nf4.dynamic_map()
    assert dyn.numel() == 256 and dyn[0].item() == pytest.approx(-0.99296875) and dyn[-1] == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_and_absmax_identical_to_bnb(bnbf: ModuleType, shape: tuple, dtype: torch.dtype) -> None:
    torch.manual_seed(hash(shape) % 1000)
    w = torch.randn(shape).to(dtype)
    q = quantize_nf4(w, double_quant=False)
    packed, state = _bnb_quantize(bnbf, w, double_quant=False)
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.absmax, state.absmax)
    assert q.shape == w.shape and q.dtype == dtype
    _assert_dequant_matches_bnb(bnbf, q, dtype)
    theirs = bnbf.dequantize_4bit(packed.view(-1, 1), state)
    assert torch.equal(dequantize_nf4(q).reshape(-1), theirs.reshape(-1))


def _special_weight(dtype: torch.dtype) -> torch.Tensor:
    """All-zero blocks (full and trailing), huge and tiny magnitudes, exact ties, odd numel."""
    torch.manual_seed(1)
    g = torch.randn(40, 64)
    g[3] = 0.0  # all-zero full block
    g[5] *= 1e30 if dtype != torch.float16 else 1e3
    g[6] *= 1e-30 if dtype != torch.float16 else 1e-3
    mids = (nf4.nf4_code()[:-1] + nf4.nf4_code()[1:]) / 2  # 15 exact NF4 midpoints (fp32)
    ties = torch.cat([torch.tensor([1.0]), mids, -mids, torch.zeros(64 - 31)])
    for row, scale in zip(range(8, 14), (1.0, 0.5, 4.0, 2.0**-10, 3.7, 0.3)):
        g[row] = ties * scale  # power-of-two scales give exact ties; 3.7 and 0.3 rounding cases
    return torch.cat([g.reshape(-1), torch.zeros(21)]).to(dtype)  # trailing all-zero partial block


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_identical_to_bnb(bnbf: ModuleType, dtype: torch.dtype) -> None:
    w = _special_weight(dtype)
    q = quantize_nf4(w, double_quant=False)
    packed, state = _bnb_quantize(bnbf, w, double_quant=False)
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    d = dequantize_nf4(q)
    assert torch.isfinite(d).all()
    assert (d[3 * 64 : 4 * 64] == 0).all() and (d[-21:] == 0).all()
    _assert_dequant_matches_bnb(bnbf, q, dtype)


def _codes(q: NF4Tensor) -> torch.Tensor:
    return torch.stack([q.packed >> 4, q.packed & 15], dim=1).reshape(-1)[: q.numel()]


def test_exact_ties_go_to_lower_code() -> None:
    mids = (nf4.nf4_code()[:-1] + nf4.nf4_code()[1:]) / 2
    for scale in (1.0, 0.25, 8.0):
        block = torch.cat([torch.tensor([1.0]), mids, -mids, torch.zeros(33)]) * scale
        codes = _codes(quantize_nf4(block, double_quant=False))
        assert codes[1:16].tolist() == list(range(15))  # midpoint k..k+1 -> k (the lower code)
        neg = -mids  # -m_k is the midpoint of codes 14-k and 15-k (the codebook is not symmetric)
        expected = [int(torch.searchsorted(mids, v, right=False)) for v in neg]
        assert codes[16:31].tolist() == expected


def test_trailing_block_quirks_match_bnb_rules() -> None:
    q = quantize_nf4(torch.zeros(3, 7), double_quant=False)
    assert q.absmax.tolist() == [pytest.approx(1e-38)]  # trailing partial block: clamped absmax
    q = quantize_nf4(torch.zeros(2, 64), double_quant=False)
    assert q.absmax.tolist() == [0.0, 0.0]  # full blocks store the true absmax
    assert (_codes(q) == 7).all() and q.packed.numel() == 64


@pytest.mark.parametrize("shape", [(1024, 1024), (4097, 33), (300, 77), (3, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_against_bnb(bnbf: ModuleType, shape: tuple, dtype: torch.dtype) -> None:
    torch.manual_seed(7)
    w = torch.randn(shape).to(dtype)
    q = quantize_nf4(w, double_quant=True)
    packed, state = _bnb_quantize(bnbf, w, double_quant=True)
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.offset, state.offset)
    assert torch.equal(q.nested_absmax, state.state2.absmax)
    # absmax codes: ours are the exact nearest codes; bnb's CPU kernel reads a 65536-step grid.
    # Differences must be one code apart, with the value within one grid step of their midpoint.
    dyn = nf4.dynamic_map()
    absmax = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")[1].absmax
    nested = q.nested_absmax.repeat_interleave(256)[: absmax.numel()]
    v = ((absmax - q.offset) * (1.0 / nested)).clamp(-1, 1)
    ours, theirs = q.absmax.long(), state.absmax.long()
    zero_block = nested == 0  # all-zero nested block: bnb gives code 0, we the code of 0.0 (127)
    assert (ours[zero_block] == 127).all() and (theirs[zero_block] == 0).all()
    diff = (ours != theirs) & ~zero_block
    assert diff.float().mean() < 0.01
    assert ((ours[diff] - theirs[diff]).abs() == 1).all()
    mid = (dyn[ours[diff]] + dyn[theirs[diff]]) / 2
    assert ((v[diff] - mid).abs() <= LUT_STEP).all()
    live = ~zero_block
    assert ((v - dyn[ours]).abs() <= (v - dyn[theirs]).abs())[live].all()  # ours is never farther
    # Identical codes decode identically: bnb's dequantization of OUR codes equals ours, bit for bit.
    _assert_dequant_matches_bnb(bnbf, q, dtype)
    absmax_dq = dequantize_absmax(q)
    assert torch.equal(absmax_dq, bnbf.dequantize_blockwise(q.absmax, _bnb_state_for(bnbf, q, dtype).state2)
                       + q.offset)  # fmt: skip


def test_chunked_path_equals_single_chunk(bnbf: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    w = torch.randn(1001, 65, dtype=torch.bfloat16)
    whole = quantize_nf4(w, double_quant=True)
    monkeypatch.setattr(nf4, "CHUNK_ELEMS", 640)  # 10 blocks per chunk, partial last chunk
    chunked = quantize_nf4(w, double_quant=True)
    for a, b in zip(whole.tensors(), chunked.tensors()):
        assert torch.equal(a, b)
    packed, state = _bnb_quantize(bnbf, w, double_quant=False)
    plain = quantize_nf4(w, double_quant=False)
    assert torch.equal(plain.packed, packed) and torch.equal(plain.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(plain), bnbf.dequantize_4bit(packed.view(-1, 1), state).view(w.shape))
    monkeypatch.setattr(nf4, "CHUNK_ELEMS", 1 << 22)
    assert torch.equal(dequantize_nf4(chunked), dequantize_nf4(whole))


@pytest.mark.parametrize(("double_quant", "abs_bound", "rel_bound"),
                         [(False, 0.0733, 0.2057), (True, 0.11, 0.28)])  # bitsandbytes' own bounds
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_error_within_bnb_bounds(double_quant: bool, abs_bound: float, rel_bound: float,
                                            dtype: torch.dtype) -> None:  # fmt: skip
    torch.manual_seed(0)
    a = torch.randn(1024, 1024, dtype=dtype)
    b = dequantize_nf4(quantize_nf4(a, double_quant=double_quant))
    err = (a - b).abs().float()
    assert err.mean() < abs_bound
    assert (err / (a.abs().float() + 1e-8)).mean() < rel_bound


@pytest.mark.parametrize("double_quant", [True, False])
def test_all_zero_weight_has_no_nan(double_quant: bool) -> None:
    for shape in [(64, 64), (3, 7), (1,)]:
        q = quantize_nf4(torch.zeros(shape, dtype=torch.bfloat16), double_quant=double_quant)
        for t in q.tensors():
            assert torch.isfinite(t.float()).all()
        d = dequantize_nf4(q)
        assert d.shape == shape and (d == 0).all()


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip(double_quant: bool) -> None:
    torch.manual_seed(2)
    q = quantize_nf4(torch.randn(130, 67, dtype=torch.bfloat16), double_quant=double_quant)
    buf = io.BytesIO()
    torch.save(q.to_state_dict("layer.weight"), buf)
    buf.seek(0)
    back = NF4Tensor.from_state_dict(torch.load(buf), prefix="layer.weight")
    assert (back.shape, back.dtype, back.blocksize, back.double_quant) == (q.shape, q.dtype, 64, double_quant)
    assert all(torch.equal(a, b) for a, b in zip(q.tensors(), back.tensors()))
    assert back.nbytes == q.nbytes
    assert torch.equal(dequantize_nf4(back), dequantize_nf4(q))


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_matches_bnb_layer(bnbf: ModuleType, double_quant: bool) -> None:
    import bitsandbytes as bnb

    torch.manual_seed(4)
    w = torch.randn(96, 128)
    layer = bnb.nn.Linear4bit(128, 96, bias=False, compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=double_quant,
                                     quant_type="nf4", module=layer)  # fmt: skip
    theirs = layer.to("cpu").state_dict()
    ours = quantize_nf4(w, double_quant=double_quant).to_state_dict("weight")
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        if key == "weight.absmax" and double_quant:
            assert (value != theirs[key]).float().mean() < 0.01  # see test_double_quant_against_bnb
            continue
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key
    loaded, ref = NF4Tensor.from_state_dict(dict(theirs)), quantize_nf4(w, double_quant=double_quant)
    gap = (dequantize_nf4(loaded) - dequantize_nf4(ref)).abs().max()
    assert gap <= (0.02 * w.abs().max() if double_quant else 0.0)  # one absmax code step at most


def test_from_state_dict_rejects_other_formats() -> None:
    state = quantize_nf4(torch.randn(64, 64)).to_state_dict()
    wrong = dict(state, **{"weight.quant_map": torch.linspace(-1, 1, 16)})
    with pytest.raises(ValueError, match="quant_map"):
        NF4Tensor.from_state_dict(wrong)
    bad_shape = dict(state, **{"weight": state["weight"][:-1]})
    with pytest.raises(ValueError, match="packed"):
        NF4Tensor.from_state_dict(bad_shape)


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        quantize_nf4(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError):
        quantize_nf4(torch.ones(0))
    with pytest.raises(ValueError):
        quantize_nf4(torch.ones(8), blocksize=63)


def test_tensor_like_interface() -> None:
    q = quantize_nf4(torch.randn(48, 80, dtype=torch.float16))
    assert q.shape == torch.Size([48, 80]) and q.ndim == 2 and q.numel() == 3840 and q.size(1) == 80
    assert q.requires_grad is False and q.device.type == "cpu" and q.dtype == torch.float16
    assert "NF4Tensor(shape=(48, 80)" in repr(q)
    assert dequantize_nf4(q, torch.float32).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("double_quant", [True, False])
def test_cuda_matches_cpu_bit_for_bit(double_quant: bool) -> None:
    torch.manual_seed(5)
    w = torch.randn(1000, 333, dtype=torch.bfloat16)
    cpu = quantize_nf4(w, double_quant=double_quant)
    gpu = quantize_nf4(w.cuda(), double_quant=double_quant)
    assert gpu.device.type == "cuda" and gpu.nbytes == cpu.nbytes
    assert torch.equal(cpu.packed, gpu.packed.cpu())  # elementwise fp32 math and max: exact
    if double_quant:  # mean(absmax) may differ in the last bit (reduction order), so codes may too
        torch.testing.assert_close(gpu.offset.cpu(), cpu.offset, rtol=1e-6, atol=0)
        assert (gpu.absmax.cpu() != cpu.absmax).float().mean() < 0.01
    else:
        assert torch.equal(cpu.absmax, gpu.absmax.cpu())
    for dtype in DTYPES:  # the same codes decode bit for bit on both devices
        assert torch.equal(dequantize_nf4(cpu, dtype), dequantize_nf4(cpu.to("cuda"), dtype).cpu())
        torch.testing.assert_close(dequantize_nf4(gpu, dtype).cpu(), dequantize_nf4(cpu, dtype),
                                   rtol=0.02, atol=0.02)  # fmt: skip


@pytest.mark.parametrize("cols", [96, 160, 176, 192, 256])
def test_every_row_width_bnb_cpu_gets_wrong_is_refused(bnbf: ModuleType, cols: int) -> None:
    """bitsandbytes 0.50.2's native CPU dequantize mis-reads rows that are not a multiple of the block size on
    AVX512 CPUs (docs/SOURCES.md#bnb-cpu-kernels) and reads them right elsewhere. Whatever this CPU does, a
    width it gets wrong must be one ``bnb_cpu_row_problem`` refuses (so no result depends on the CPU)."""
    from lorabench.quant.sizes import bnb_cpu_row_problem

    torch.manual_seed(cols)
    q = quantize_nf4(torch.randn(64, cols, dtype=torch.bfloat16), double_quant=False)
    ours = dequantize_nf4(q, torch.bfloat16)
    theirs = bnbf.dequantize_4bit(q.packed.view(-1, 1), _bnb_state_for(bnbf, q, torch.bfloat16))
    if not torch.equal(ours.reshape(-1), theirs.reshape(-1)):
        assert bnb_cpu_row_problem(cols) is not None
    assert (bnb_cpu_row_problem(cols) is None) == (cols % 64 == 0)
