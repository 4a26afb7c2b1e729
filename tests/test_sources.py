"""Every source a number relies on lives in the repository (docs/SOURCES.md), and every citation resolves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "docs" / "SOURCES.md"
ANCHOR_DEF = re.compile(r'<a id="([a-z0-9-]+)"></a>')
ANCHOR_USE = re.compile(r"docs/SOURCES\.md#([a-z0-9-]+)")
# Places outside the repository a user does not have (split so this file does not match itself).
OUTSIDE = ("REFERENCE" + ".md", "/work" + "/", "." + "library/", "KINDS" + ".md")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cfg", ".txt", ""}


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [ROOT / f for f in out.splitlines() if not f.startswith(("results/", "reports/"))]
    return [f for f in files if f.is_file() and f.suffix in TEXT_SUFFIXES and f.stat().st_size < 2_000_000]


def _anchors() -> set[str]:
    return set(ANCHOR_DEF.findall(SOURCES.read_text()))


def test_no_citation_leaves_the_repository() -> None:
    hits = [f"{f.relative_to(ROOT)}: {word}" for f in _tracked_text_files()
            for word in OUTSIDE if word in f.read_text(errors="replace")]
    assert not hits, "cite docs/SOURCES.md instead of: " + "; ".join(hits)


def test_every_cited_anchor_exists() -> None:
    anchors = _anchors()
    missing = [f"{f.relative_to(ROOT)}#{a}" for f in _tracked_text_files()
               for a in ANCHOR_USE.findall(f.read_text(errors="replace")) if a not in anchors]
    assert not missing, f"docs/SOURCES.md lacks anchors: {missing}"


def test_every_entry_has_a_link_that_resolves() -> None:
    text = SOURCES.read_text()
    entries = re.split(r"\n(?=(?:- )?<a id=)", text)[1:]
    assert len(entries) > 20
    for entry in entries:
        links = re.findall(r"\]\(([^)\s]+)\)", entry) + re.findall(r"(?<!\()https?://\S+", entry)
        assert links, f"entry without a link: {entry[:80]}"
        for link in links:
            if not link.startswith("http"):
                assert (SOURCES.parent / link.split("#")[0]).exists(), f"broken link {link}"
    assert len(_anchors()) == len(ANCHOR_DEF.findall(text)), "duplicate anchor"


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "prefix", "adapters", "ia3"])
def test_explain_cites_sources(method: str) -> None:
    from lorabench.catalog import load_model
    from lorabench.memory.explain import explain
    from lorabench.memory.planner import predict
    from lorabench.methods import make_config
    from lorabench.specs import TrainSpec

    model, cfg, train = load_model("tiny-llama"), make_config(method, {}), TrainSpec()
    rows = explain(model, cfg, train, predict(model, cfg, train))
    anchors = _anchors()
    for row in rows:
        cited = ANCHOR_USE.findall(row["source"])
        assert all(a in anchors for a in cited), row
    assert sum(bool(ANCHOR_USE.search(r["source"])) for r in rows) >= len(rows) - 2
