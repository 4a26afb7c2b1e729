"""pyproject.toml in the current packaging form: `pip install` prints no setuptools deprecation block."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_string() -> None:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # A `{ text = ... }` table is deprecated since setuptools 77 (PEP 639); the SPDX string needs >= 77.
    assert isinstance(doc["project"]["license"], str) and re.fullmatch(r"[A-Za-z0-9.\-+ ()]+", doc["project"]["license"])
    requires = " ".join(doc["build-system"]["requires"])
    assert (m := re.search(r"setuptools>=(\d+)", requires)) and int(m.group(1)) >= 77
    assert not any(c.startswith("License ::") for c in doc["project"].get("classifiers", []))
