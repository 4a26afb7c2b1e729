"""The GPU catalog: every entry complete, dense (not sparse) peaks, every source cited in docs/SOURCES.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorabench.catalog import all_gpus, gpu_names, load_gpu

SOURCES = (Path(__file__).resolve().parent.parent / "docs" / "SOURCES.md").read_text()
ANCHORS = set(re.findall(r'<a id="([^"]+)"></a>', SOURCES))


@pytest.mark.parametrize("name", gpu_names())
def test_entry_is_complete_and_cited(name: str) -> None:
    g = load_gpu(name)
    assert g.kind == "gpu"
    assert g.spec_source in ANCHORS and g.price_source in ANCHORS
    assert g.usd_per_hour > 0 and re.fullmatch(r"\d{4}-\d{2}-\d{2}", g.price_date)
    assert g.fp32_flops_per_s > 0 and g.fp16_flops_per_s >= g.bf16_flops_per_s
    assert g.interconnect_bidirectional_bytes_per_s >= g.pcie_bidirectional_bytes_per_s > 0
    assert g.nvlink_domain_gpus in (1, 2, 8)
    # memory_bytes is nvidia-smi's MiB total: a whole number of MiB
    assert g.memory_bytes % 2**20 == 0


def test_new_cards_dense_figures() -> None:
    """Half the datasheets' sparse figures (L40S 733, H100 NVL 1,671; A40 299.4; A6000 309.7)."""
    assert load_gpu("l40s").bf16_flops_per_s == pytest.approx(733e12 / 2, rel=0.015)
    assert load_gpu("h100-nvl").bf16_flops_per_s == pytest.approx(1671e12 / 2, rel=0.015)
    assert load_gpu("a40").bf16_flops_per_s == pytest.approx(299.4e12 / 2, rel=0.015)
    assert load_gpu("a6000").bf16_flops_per_s == pytest.approx(309.7e12 / 2, rel=0.015)
    assert load_gpu("5090").memory_bandwidth_bytes_per_s == 1792e9


def test_48gb_cards_are_in_the_catalog() -> None:
    names = {g.name for g in all_gpus() if 44 * 2**30 < g.memory_bytes <= 48 * 2**30}
    assert names == {"a40-48gb", "l40s-48gb", "rtx-a6000-48gb"}


def test_peak_by_dtype_and_links() -> None:
    t4 = load_gpu("t4")
    assert t4.peak_flops_per_s("fp16") == 65e12 and t4.peak_flops_per_s("bf16") == t4.fp32_flops_per_s
    a6000 = load_gpu("a6000")
    # an NVLink bridge joins 2 cards; 4 cards talk over PCIe; one direction is half the quoted figure
    assert a6000.link_bytes_per_s(2) == 112.5e9 / 2 and a6000.link_bytes_per_s(4) == 64e9 / 2
    assert load_gpu("h100").link_bytes_per_s(8) == 450e9
