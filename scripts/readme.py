"""Keep README.md and docs/*.md true: regenerate every command-output block from a real run of today's code.

    python scripts/readme.py            # rewrite the fast blocks, includes and values (`make docs`)
    python scripts/readme.py --slow     # also re-run the slow blocks and record when (`make docs-slow`)
    python scripts/readme.py --check    # exit 1 with a diff when a fast block differs (tests/test_readme.py)

Markers are HTML comments (invisible on GitHub); everything between a marker and ``<!-- /docs -->`` is
generated. See "Generated blocks" in docs/ARCHITECTURE.md for the syntax:

    <!-- docs: $ lorabench plan --model 70b --method qlora -->          one command, output in a code block
    <!-- docs head=5 tail=2                                            several commands, long outputs cut
    $ lorabench models
    $ lorabench gpus
    -->
    <!-- docs slow id=trace-70b: $ lorabench trace --model 70b -->      re-run only by --slow; a dated,
                                                                        committed transcript otherwise
    <!-- docs slow id=sweep fresh=results/_scratch/s: $ lorabench run ... results_dir=results/_scratch/s -->
    <!-- docs include reports/cpu-smoke/README.md "### Error summary per method" -->   first table there
    <!-- value: results/bench/docs-transcripts.json trace-70b.wall_s .0f -->11<!-- /value -->   inline
    <!-- value: "$ lorabench plan --model 7b --format json" "rows.component=total (device).GiB" .1f -->16.6<!-- /value -->
"""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRANSCRIPTS = Path("results/bench/docs-transcripts.json")
# A marker starts a line; an indented or back-quoted one (an example in prose) is left alone.
BLOCK = re.compile(r"^<!-- docs\b(?P<spec>.*?)-->\n(?P<body>.*?)^<!-- /docs -->", re.S | re.M)
VALUE = re.compile(r"(?<!`)<!-- value: (?P<spec>[^>]*?) -->(?P<text>.*?)<!-- /value -->")
SCRATCH = ("results/_scratch/", "reports/_scratch/")  # what fresh=DIR may delete before a slow block runs
FAST_TIMEOUT_S = 120
SLOW_TIMEOUT_S = 1800


class DocsError(Exception):
    """A marker that cannot be rendered: one line naming the file, the marker and the problem."""


@dataclass(frozen=True)
class Block:
    """One parsed ``<!-- docs ... -->`` marker."""

    commands: tuple[str, ...] = ()
    slow: bool = False
    block_id: str = ""
    head: int = 0
    tail: int = 0
    drop: str = ""
    include: tuple[str, str] | None = None
    options: dict[str, str] = field(default_factory=dict)


def default_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def parse_spec(spec: str) -> Block:
    """``[slow] [id=X] [head=N] [tail=N] [include PATH "HEADING"] [:] $ cmd ...`` -> Block."""
    cut = spec.find("$ ")
    head_part, cmd_part = (spec, "") if cut < 0 else (spec[:cut], spec[cut:])
    words = shlex.split(head_part.strip().rstrip(":").strip())
    commands = tuple(c.strip() for c in re.findall(r"\$ ([^\n]+)", cmd_part))
    include = None
    if words and words[0] == "include":
        if len(words) != 3:
            raise DocsError(f"include needs a path and a heading, got {words[1:]}")
        include, words = (words[1], words[2]), []
    opts = dict(w.split("=", 1) for w in words if "=" in w)
    flags = {w for w in words if "=" not in w}
    unknown = (flags - {"slow"}) | (set(opts) - {"id", "head", "tail", "fresh", "drop"})
    if unknown:
        raise DocsError(f"unknown marker option(s) {sorted(unknown)}")
    if not commands and include is None:
        raise DocsError("a docs marker needs '$ command' lines or 'include PATH \"HEADING\"'")
    if "slow" in flags and not opts.get("id"):
        raise DocsError("a slow block needs id=NAME (its timing is recorded under that name)")
    if "fresh" in opts and not opts["fresh"].startswith(SCRATCH):
        raise DocsError(f"fresh= may only empty a folder under {' or '.join(SCRATCH)}")
    return Block(commands=commands, slow="slow" in flags, block_id=opts.get("id", ""),
                 head=int(opts.get("head", 0)), tail=int(opts.get("tail", 0)), drop=opts.get("drop", ""),
                 include=include, options=opts)


def argv_for(command: str) -> list[str]:
    """``lorabench ...`` and ``python ...`` run with this interpreter; anything else as written."""
    argv = shlex.split(command)
    if argv[0] == "lorabench":
        return [sys.executable, "-m", "lorabench.cli", *argv[1:]]
    if argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    return argv


def run_command(command: str, timeout_s: float, root: Path = ROOT) -> tuple[str, float]:
    """Run one command as a user would; return (stdout + stderr as printed, wall seconds).

    Fast blocks run in parallel threads; ``run_slow`` adds the CPU seconds of each (serial) command."""
    # Progress bars (tqdm, on stderr) are transient on a terminal and timing-dependent: not part of a transcript.
    env = dict(os.environ, PYTHONHASHSEED="0", COLUMNS="200", TERM="dumb", NO_COLOR="1", TQDM_DISABLE="1")
    start = time.perf_counter()
    proc = subprocess.run(argv_for(command), cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout_s, check=False)
    wall_s = time.perf_counter() - start
    if "Traceback (most recent call last)" in proc.stdout:
        raise DocsError(f"`{command}` crashed:\n{proc.stdout[-2000:]}")
    return "\n".join(line.rstrip() for line in proc.stdout.rstrip("\n").splitlines()), wall_s


def cut_lines(text: str, head: int, tail: int, drop: str = "") -> str:
    """Drop lines matching the regex ``drop``, then keep the first ``head`` and last ``tail`` lines with
    ``...`` between (0 and 0: everything)."""
    lines = [line for line in text.splitlines() if not (drop and re.search(drop, line))]
    if not (head or tail) or len(lines) <= head + tail:
        return "\n".join(lines)
    return "\n".join(lines[:head] + ["..."] + (lines[-tail:] if tail else []))


def render_transcript(block: Block, outputs: dict[str, str]) -> str:
    parts = []
    for cmd in block.commands:
        out = cut_lines(outputs[cmd], block.head, block.tail, block.drop)
        parts.append(f"$ {cmd}\n{out}" if out else f"$ {cmd}")
    return "```\n" + "\n".join(parts) + "\n```\n"


def render_include(path: str, heading: str, root: Path = ROOT) -> str:
    """The first markdown table after ``heading`` in ``path``."""
    lines = (root / path).read_text().splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        raise DocsError(f"include: heading {heading!r} not found in {path}") from None
    table: list[str] = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append(line)
        elif table or line.startswith("#"):
            break
    if not table:
        raise DocsError(f"include: no table after {heading!r} in {path}")
    return "\n".join(table) + "\n"


def lookup(doc: object, key: str) -> object:
    """Dotted path; ``name=value`` picks the first list element whose ``name`` equals ``value``."""
    for part in key.split("."):
        if isinstance(doc, list) and "=" in part:
            name, want = part.split("=", 1)
            doc = next((el for el in doc if str(el.get(name)) == want), None)
        elif isinstance(doc, list):
            doc = doc[int(part)]
        elif isinstance(doc, dict):
            doc = doc.get(part)
        if doc is None:
            raise DocsError(f"value: key {key!r} not found")
    return doc


def render_value(spec: str, root: Path = ROOT, ran: dict[str, str] | None = None) -> str:
    """``SOURCE KEY [/DIVISOR] [FORMAT]`` -> the formatted value. SOURCE is a JSON file under the repository
    or, quoted, a command whose stdout is JSON (``"$ lorabench plan ... --format json"``); words may be
    quoted (``"rows.component=total (device).GiB"``). Numbers in strings are formatted as numbers."""
    words = shlex.split(spec)
    if len(words) < 2:
        raise DocsError(f"value marker needs a source and a key: {spec!r}")
    source, key, rest = words[0], words[1], words[2:]
    if source.startswith("$ "):
        ran = {} if ran is None else ran
        if source not in ran:
            ran[source] = run_command(source[2:], FAST_TIMEOUT_S, root)[0]
        try:
            doc = json.loads(ran[source])
        except json.JSONDecodeError:
            raise DocsError(f"value: `{source[2:]}` did not print JSON") from None
    elif (root / source).exists():
        doc = json.loads((root / source).read_text())
    else:
        raise DocsError(f"value: {source} does not exist (run the benchmark that writes it)")
    value = lookup(doc, key)
    divisor = next((float(w[1:]) for w in rest if w.startswith("/")), 1.0)
    fmt = next((w for w in rest if not w.startswith("/")), "")
    if isinstance(value, str) and (fmt or divisor != 1.0):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value / divisor if divisor != 1.0 else value, fmt)
    return str(value)


def git_commit(root: Path = ROOT) -> str:
    sha = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=root, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return sha.strip() + (" + local changes" if dirty else "")


def run_slow(block: Block, root: Path = ROOT) -> tuple[str, dict]:
    """Run a slow block's commands one after the other; its transcript and a dated record of the run."""
    outputs, wall_s = {}, 0.0
    if block.options.get("fresh"):
        shutil.rmtree(root / block.options["fresh"], ignore_errors=True)
    commit = git_commit(root)  # before the commands run: files they regenerate are not "local changes"
    load_before = os.getloadavg()[0]
    cpu_before = _children_cpu_s()
    for cmd in block.commands:
        outputs[cmd], seconds = run_command(cmd, SLOW_TIMEOUT_S, root)
        wall_s += seconds
    cpu_s = _children_cpu_s() - cpu_before
    load = max(load_before, os.getloadavg()[0])
    record = {"date": dt.date.today().isoformat(), "commit": commit, "wall_s": round(wall_s, 1),
              "cpu_s": round(cpu_s, 1), "cpu_count": os.cpu_count(), "load_avg_1min": round(load, 2),
              "commands": list(block.commands)}
    # CPU time counts waited-for child processes only (a job server's forked grandchildren are not in it).
    note = (f"<sub>Recorded {record['date']} at commit {record['commit']}: {wall_s:.1f} s wall, {cpu_s:.1f} s "
            f"CPU, on {record['cpu_count']} CPU cores at load {load:.1f}; `make docs-slow` re-runs it.</sub>\n")
    return render_transcript(block, outputs) + note, record


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def blocks_in(text: str, name: str) -> list[tuple[re.Match, Block]]:
    found = []
    for m in BLOCK.finditer(text):
        try:
            found.append((m, parse_spec(m.group("spec"))))
        except (DocsError, ValueError) as exc:
            raise DocsError(f"{name}: {m.group(0).splitlines()[0]}: {exc}") from None
    return found


def run_all(commands: list[str], root: Path = ROOT) -> dict[str, str]:
    """Each command's output, run in parallel (fast commands only)."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip(commands, (o for o, _ in pool.map(lambda c: run_command(c, FAST_TIMEOUT_S, root), commands))))


def regenerate(texts: dict[str, str], slow: bool = False, root: Path = ROOT,
               only: frozenset[str] = frozenset()) -> tuple[dict[str, str], dict, dict[str, str]]:
    """Rendered text per file name, the slow runs' records (empty unless ``slow``; ``only``: just the
    slow blocks with those ids) and the fast commands' outputs (block and value commands)."""
    parsed = {name: blocks_in(text, name) for name, text in texts.items()}
    fast = {c for found in parsed.values() for _, b in found if not b.slow for c in b.commands}
    fast |= {src[2:] for text in texts.values() for src in value_commands(text)}
    outputs = run_all(sorted(fast), root)
    records: dict[str, dict] = {}
    result = {}
    for name, text in texts.items():
        pieces, pos = [], 0
        for m, block in parsed[name]:
            if block.include:
                body = render_include(*block.include, root=root)
            elif block.slow and slow and (not only or block.block_id in only):
                body, records[block.block_id] = run_slow(block, root)
            elif block.slow:
                body = m.group("body")
            else:
                body = render_transcript(block, outputs)
            pieces += [text[pos:m.start("body")], body]
            pos = m.end("body")
        pieces.append(text[pos:])
        result[name] = "".join(pieces)
    return result, records, outputs


def _prose_lines(text: str) -> list[tuple[bool, str]]:
    """(is prose, line) for each line: fenced blocks and indented lines are code (examples)."""
    out, fenced = [], False
    for line in text.splitlines(True):
        if line.startswith("```"):
            fenced = not fenced
        out.append((not fenced and not line.startswith(("    ", "\t")), line))
    return out


def value_commands(text: str) -> set[str]:
    """The commands value markers in prose read their JSON from."""
    found = set()
    for prose, line in _prose_lines(text):
        for m in VALUE.finditer(line) if prose else ():
            words = shlex.split(m.group("spec"))
            if words and words[0].startswith("$ "):
                found.add(words[0])
    return found


def fill_values(text: str, root: Path = ROOT, ran: dict[str, str] | None = None) -> str:
    """Fill every value marker in prose; ``ran`` holds outputs of value commands already run."""
    ran = {} if ran is None else ran
    out = []
    for prose, line in _prose_lines(text):
        if prose:
            line = VALUE.sub(lambda m: m.group(0).replace(
                f"-->{m.group('text')}<!--", f"-->{render_value(m.group('spec'), root, ran)}<!--", 1), line)
        out.append(line)
    return "".join(out)


def save_records(records: dict, root: Path = ROOT) -> None:
    path = root / TRANSCRIPTS
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.update(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(doc.items())), indent=2) + "\n")


def process(files: list[Path], slow: bool = False, check: bool = False, root: Path = ROOT,
            only: frozenset[str] = frozenset()) -> list[str]:
    """Regenerate ``files``; write them (unless ``check``); return a unified diff per changed file."""
    texts = {str(f.relative_to(root)): f.read_text() for f in files}
    rendered, records, outputs = regenerate(texts, slow=slow, root=root, only=only)
    ran = {f"$ {cmd}": out for cmd, out in outputs.items()}
    if records and not check:
        save_records(records, root)
    diffs = []
    for name, new in rendered.items():
        new = fill_values(new, root, ran)
        if new != texts[name]:
            diffs.append("".join(difflib.unified_diff(texts[name].splitlines(True), new.splitlines(True),
                                                      f"{name} (committed)", f"{name} (today's code)")))
            if not check:
                (root / name).write_text(new)
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="markdown files (default: README.md docs/*.md)")
    ap.add_argument("--slow", action="store_true", help="also re-run the slow blocks")
    ap.add_argument("--only", action="append", default=[], metavar="ID", help="with --slow: only these slow blocks")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a block differs")
    args = ap.parse_args(argv)
    files = [f.resolve() for f in args.files] or default_files()
    try:
        diffs = process(files, slow=args.slow or bool(args.only), check=args.check, only=frozenset(args.only))
    except DocsError as exc:
        print(f"readme.py: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        for d in diffs:
            print(d)
    if args.check and diffs:
        print("readme.py: blocks differ from what today's code prints; run `make docs`", file=sys.stderr)
        return 1
    print(f"readme.py: {len(diffs)} file(s) {'would change' if args.check else 'rewritten'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
