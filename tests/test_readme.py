"""README.md and docs/*.md say what today's code prints (scripts/readme.py, `make docs`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lorabench_readme_tool", ROOT / "scripts" / "readme.py")
readme = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = readme
_spec.loader.exec_module(readme)  # type: ignore[union-attr]


def test_committed_docs_match_todays_output() -> None:
    diffs = readme.process(readme.default_files(), check=True)
    assert not diffs, "run `make docs`:\n" + "\n".join(diffs)


def test_every_readme_output_block_is_generated() -> None:
    """A code block that shows a command's output (``$ ...``) must sit under a marker."""
    for path in readme.default_files():
        text = path.read_text()
        spans = [(m.start("body"), m.end("body")) for m in readme.BLOCK.finditer(text)]
        pos = 0
        while (i := text.find("```\n$ ", pos)) >= 0:
            assert any(a <= i < b for a, b in spans), f"{path.name}: unmarked output block at char {i}"
            pos = i + 1


def test_slow_blocks_carry_a_dated_record() -> None:
    for path in readme.default_files():
        for m, block in readme.blocks_in(path.read_text(), path.name):
            if block.slow:
                assert "<sub>Recorded 20" in m.group("body") and "at commit" in m.group("body"), block.block_id


def _doc(tmp_path: Path, text: str) -> Path:
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    return doc


def test_fast_block_rewritten_and_checked(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "intro\n<!-- docs: $ python -c \"print('a'); print('b  ')\" -->\n```\nstale\n```\n"
                         "<!-- /docs -->\nafter\n")
    assert readme.process([doc], check=True, root=tmp_path)
    assert "stale" in doc.read_text()  # --check writes nothing
    readme.process([doc], root=tmp_path)
    assert doc.read_text() == ("intro\n<!-- docs: $ python -c \"print('a'); print('b  ')\" -->\n```\n"
                               "$ python -c \"print('a'); print('b  ')\"\na\nb\n```\n<!-- /docs -->\nafter\n")
    assert readme.process([doc], check=True, root=tmp_path) == []


def test_several_commands_head_tail_and_exit_codes(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "<!-- docs head=2 tail=1 drop=\"^[23]$\"\n$ python -c \"print(*range(5), sep=chr(10))\"\n"
                         "$ python -c \"import sys; sys.exit('bad input')\"\n-->\n<!-- /docs -->\n")
    readme.process([doc], root=tmp_path)
    assert "\n0\n1\n4\n$ python -c \"import sys; sys.exit('bad input')\"\nbad input\n```" in doc.read_text()


def test_slow_block_kept_unless_slow(tmp_path: Path) -> None:
    marker = "<!-- docs slow id=s1: $ python -c \"print(42)\" -->\n"
    doc = _doc(tmp_path, marker + "```\nrecorded earlier\n```\n<!-- /docs -->\n"
                         "took <!-- value: results/bench/docs-transcripts.json s1.cpu_count d -->?<!-- /value --> cores\n")
    with pytest.raises(readme.DocsError, match="does not exist"):
        readme.process([doc], check=True, root=tmp_path)  # the value's file is written by --slow
    readme.process([doc], slow=True, root=tmp_path)
    text = doc.read_text()
    assert "$ python -c \"print(42)\"\n42\n```\n<sub>Recorded 20" in text
    record = json.loads((tmp_path / readme.TRANSCRIPTS).read_text())["s1"]
    assert record["commands"] == ['python -c "print(42)"'] and record["wall_s"] >= 0
    assert f"took <!-- value: results/bench/docs-transcripts.json s1.cpu_count d -->{record['cpu_count']}<!--" in text
    assert readme.process([doc], check=True, root=tmp_path) == []  # fast mode leaves the transcript alone


def test_include_and_values(tmp_path: Path) -> None:
    (tmp_path / "r.md").write_text("# R\n\n### Table\n\ntext\n\n| a |\n|---|\n| 1 |\n\n| other |\n")
    (tmp_path / "b.json").write_text(json.dumps({"rows": [{"case": "x", "s": 9.96}, {"case": "y", "s": 120.0}]}))
    doc = _doc(tmp_path, "<!-- docs include r.md \"### Table\" -->\nold\n<!-- /docs -->\n"
                         "x <!-- value: b.json rows.case=y.s /60 .1f -->?<!-- /value --> min, "
                         "`<!-- value: b.json nothing -->` is an example\n")
    readme.process([doc], root=tmp_path)
    assert doc.read_text() == ("<!-- docs include r.md \"### Table\" -->\n| a |\n|---|\n| 1 |\n<!-- /docs -->\n"
                               "x <!-- value: b.json rows.case=y.s /60 .1f -->2.0<!-- /value --> min, "
                               "`<!-- value: b.json nothing -->` is an example\n")


@pytest.mark.parametrize("marker, problem", [
    ("<!-- docs -->", "needs '\\$ command'"),
    ("<!-- docs colour=red: $ python -V -->", "unknown marker option"),
    ("<!-- docs slow: $ python -V -->", "needs id="),
    ("<!-- docs slow id=a fresh=results: $ python -V -->", "fresh= may only"),
    ("<!-- docs include r.md -->", "include needs"),
    ("<!-- docs: $ python -c \"raise ValueError\" -->", "crashed"),
])
def test_bad_markers_are_one_line_errors(tmp_path: Path, marker: str, problem: str) -> None:
    doc = _doc(tmp_path, f"{marker}\n<!-- /docs -->\n")
    with pytest.raises(readme.DocsError, match=problem):
        readme.process([doc], check=True, root=tmp_path)


def test_indented_examples_are_not_markers(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "    <!-- docs: $ python -V -->\n    <!-- /docs -->\n"
                         "    <!-- value: missing.json k -->1<!-- /value -->\n"
                         "```\n<!-- value: missing.json k -->1<!-- /value -->\n```\n")
    assert readme.process([doc], check=True, root=tmp_path) == []


def test_value_from_a_command(tmp_path: Path) -> None:
    cmd = "$ python -c 'import json; print(json.dumps(dict(rows=[dict(component=chr(116) + chr(32), GiB=str(2.5))])))'"
    doc = _doc(tmp_path, f"total <!-- value: \"{cmd}\" \"rows.component=t .GiB\" .2f -->?<!-- /value --> GiB\n")
    readme.process([doc], root=tmp_path)
    assert doc.read_text().endswith("-->2.50<!-- /value --> GiB\n")
    doc.write_text(f"<!-- value: \"$ python -c 'print(1'\" k -->?<!-- /value -->\n")
    with pytest.raises(readme.DocsError, match="did not print JSON"):
        readme.process([doc], root=tmp_path)
