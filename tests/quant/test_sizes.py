"""lorabench.quant.sizes: exact NF4 storage bytes, torch-free, equal to NF4Tensor.nbytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorabench.quant import nf4
from lorabench.quant.sizes import (
    SHARED_CONSTANT_BYTES,
    bnb_extra_bytes_per_layer,
    nf4_bytes_per_param,
    nf4_storage_bytes,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_sizes_module_does_not_import_torch() -> None:
    code = "import lorabench.quant.sizes, lorabench.quant, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


@pytest.mark.parametrize(
    ("numel", "double_quant", "expected_bytes"),
    [
        # 4096x4096: 8388608 packed + 262144 uint8 absmax + 1024 fp32 nested + fp32 offset
        (4096 * 4096, True, 8_388_608 + 262_144 + 4 * 1024 + 4),
        (4096 * 4096, False, 8_388_608 + 4 * 262_144),
        (1, True, 1 + 1 + 4 + 4),
        (1, False, 1 + 4),
        (65, False, 33 + 2 * 4),
        (64 * 256 + 1, True, (64 * 256 + 2) // 2 + 257 + 2 * 4 + 4),
    ],
)
def test_storage_bytes_known_values(numel: int, double_quant: bool, expected_bytes: int) -> None:
    assert nf4_storage_bytes(numel, double_quant=double_quant) == expected_bytes


def test_bytes_per_param_limits_match_qlora() -> None:
    # QLoRA Sec. 3: 0.5 + 1/64 + 4/(64*256) with double quantization, 0.5 + 4/64 without.
    assert nf4_bytes_per_param() == 0.5 + 1 / 64 + 4 / (64 * 256) == 0.515869140625
    assert nf4_bytes_per_param(double_quant=False) == 0.5625
    big = 8192 * 8192
    assert nf4_bytes_per_param(big) == nf4_storage_bytes(big) / big
    assert abs(nf4_bytes_per_param(big) - nf4_bytes_per_param()) < 1e-6


def test_shared_constants_and_bnb_overhead() -> None:
    assert SHARED_CONSTANT_BYTES == 16 * 4 + 256 * 4
    assert bnb_extra_bytes_per_layer(True) == 1088
    assert bnb_extra_bytes_per_layer(False) == 64


@pytest.mark.parametrize("bad", [dict(numel=0), dict(numel=-3), dict(numel=10, blocksize=63),
                                 dict(numel=10, blocksize=0), dict(numel=10, dq_blocksize=0)])  # fmt: skip
def test_storage_bytes_rejects_bad_input(bad: dict) -> None:
    with pytest.raises(ValueError):
        nf4_storage_bytes(**bad)


SHAPES = [(1,), (2,), (3,), (63,), (64,), (65,), (127,), (128,), (7, 9), (3, 5, 7), (64 * 256,),
          (64 * 256 + 1,), (64 * 256 * 3 - 1,), (96, 4097), (1, 64 * 257)]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4tensor_nbytes_equals_storage_bytes(shape: tuple[int, ...], double_quant: bool) -> None:
    q = nf4.quantize_nf4(torch.randn(shape), double_quant=double_quant)
    expected = nf4_storage_bytes(q.numel(), double_quant=double_quant)
    assert q.nbytes == expected
    assert sum(t.numel() * t.element_size() for t in q.tensors()) == expected


@settings(max_examples=30, deadline=None)
@given(numel=st.integers(1, 50_000), blocksize=st.sampled_from([32, 64, 128, 256]),
       dq_blocksize=st.sampled_from([16, 256]), double_quant=st.booleans())  # fmt: skip
def test_nbytes_matches_for_random_sizes(numel: int, blocksize: int, dq_blocksize: int,
                                         double_quant: bool) -> None:  # fmt: skip
    q = nf4.quantize_nf4(torch.randn(numel), blocksize, double_quant, dq_blocksize)
    assert q.nbytes == nf4_storage_bytes(numel, blocksize, double_quant, dq_blocksize)
