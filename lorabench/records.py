"""Run records: one JSON object per line in ``results/<sweep>/records.jsonl`` (torch-free).

The sweep runner appends one record per training run with :func:`append_record`; resume skips the
``run_id`` values :func:`completed_ids` returns; reports read them back with :func:`read_records` or, as
one flat table, with :func:`load`. Schema 1 (every key present, values may be null where noted):

* ``schema`` (1), ``run_id`` (:func:`run_id` of ``config``), ``sweep`` (name), ``status`` (:data:`STATUSES`);
* ``config``: model, method (``MethodConfig.to_dict()``), train (TrainSpec fields, optimizer by name),
  device, gpu, memory_cap_bytes, warmup_steps, timed_steps, seed: everything that defines the run;
* ``predicted`` (``Prediction.to_dict()`` + ``fits``), ``traced`` (fake-tensor trace or null),
  ``measured`` (tracker, torch.cuda and NVML peaks, step times, tokens/s, losses; null if never measured);
* ``error`` (one line or null), ``env`` (:func:`environment`), ``timestamp`` (ISO-8601 UTC).

Writes are crash-safe: a record is one ``write()`` of a full line to a file opened with ``O_APPEND``
under an exclusive ``flock`` and followed by ``fsync``, so concurrent jobs never interleave and a crash
leaves at most one torn last line. Readers skip (and report) torn or invalid lines instead of failing,
and a writer that finds a torn last line starts its record on a fresh line.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

from lorabench.errors import UserError

SCHEMA_VERSION = 1
RECORDS_FILE = "records.jsonl"
#: Every record carries these keys (values of predicted/traced/measured/error may be null).
REQUIRED_KEYS: tuple[str, ...] = (
    "schema", "run_id", "sweep", "status", "config", "predicted", "traced", "measured", "error", "env",
    "timestamp",
)
STATUSES: tuple[str, ...] = ("ok", "oom", "failed", "timeout", "nan")
#: Versions recorded in env (distribution name -> env key).
_PACKAGES: dict[str, str] = {
    "torch": "torch", "transformers": "transformers", "bitsandbytes": "bitsandbytes", "peft": "peft",
}
_REPO_DIR = Path(__file__).resolve().parent.parent


def canonical_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, ASCII only, no NaN (the text ``run_id`` hashes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def run_id(config: dict[str, Any]) -> str:
    """Identity of a run: the first 16 hex digits of sha1(canonical JSON of its config).

    Two runs with the same config (model, method knobs, train spec, device, GPU, cap, steps, seed) get
    the same id, which is what resume relies on.
    """
    return hashlib.sha1(canonical_json(config).encode("ascii")).hexdigest()[:16]


def _finite(obj: Any) -> Any:
    """Replace non-finite floats (a NaN loss) by None so the line stays strict JSON (jq, pandas)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def validate(record: Any) -> str | None:
    """Why ``record`` is not a valid schema-1 record, or None when it is."""
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        return "missing keys " + ", ".join(missing)
    if record["schema"] != SCHEMA_VERSION:
        return f"schema {record['schema']!r} is not {SCHEMA_VERSION}"
    if record["status"] not in STATUSES:
        return f"status {record['status']!r} is not one of {', '.join(STATUSES)}"
    if not isinstance(record["config"], dict):
        return "config is not an object"
    if not isinstance(record["run_id"], str) or record["run_id"] != run_id(record["config"]):
        return f"run_id {record['run_id']!r} is not the hash of its config"
    for key in ("predicted", "traced", "measured", "env"):
        if record[key] is not None and not isinstance(record[key], dict):
            return f"{key} is neither an object nor null"
    return None


def append_record(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one record as one line, atomically and durably.

    Opens with ``O_APPEND`` (creating parent folders), takes an exclusive ``flock``, starts on a fresh line
    if the file ends in a torn line, writes the whole line in one call, then ``fsync``.

    Raises:
        ValueError: the record lacks a required key, has an unknown status, or its run_id does not match
            :func:`run_id` of its config (a programming error in the caller, not user input).
    """
    problem = validate(record)
    if problem is not None:
        raise ValueError(f"refusing to append an invalid run record: {problem}")
    line = (json.dumps(_finite(record), sort_keys=False, ensure_ascii=True, allow_nan=False) + "\n").encode()
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _lock(fd)
        size = os.fstat(fd).st_size
        if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # the previous writer died mid-line: keep its fragment on its own line
        view = memoryview(line)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the flock


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: O_APPEND single writes are still atomic enough
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


def records_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it is a file, else ``path/records.jsonl``."""
    p = Path(path)
    return p / RECORDS_FILE if p.is_dir() else p


def read_records(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """All valid records of a file (or of a folder's records.jsonl) plus one warning per skipped line.

    Never raises on content: torn lines (a crash mid-write), invalid JSON and records failing
    :func:`validate` are skipped and described in the warnings.

    Raises:
        UserError: the file does not exist.
    """
    file = records_path(path)
    if not file.is_file():
        raise UserError(f"no run records at {file}", "pass a results folder holding records.jsonl "
                        "(written by `python -m lorabench.sweep`)")
    data = file.read_bytes()
    lines = data.split(b"\n")
    records: list[dict[str, Any]] = []
    warnings: list[str] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        torn = number == len(lines)  # the last chunk has no trailing newline
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            what = "torn last line (a write was cut off)" if torn else f"invalid JSON ({err.__class__.__name__})"
            warnings.append(f"{file.name} line {number}: {what}; skipped")
            continue
        problem = validate(record)
        if problem is not None:
            warnings.append(f"{file.name} line {number}: invalid record ({problem}); skipped")
            continue
        records.append(record)
    return records, warnings


def completed_ids(path: str | os.PathLike[str], statuses: Iterable[str] = ("ok",)) -> set[str]:
    """run_ids already recorded with one of ``statuses`` (empty when the file does not exist yet)."""
    if not records_path(path).is_file():
        return set()
    wanted = set(statuses)
    records, _ = read_records(path)
    return {r["run_id"] for r in records if r["status"] in wanted}


def latest_per_run(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One record per run_id: the last one appended (a retried run supersedes its failed attempt)."""
    latest: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for record in records:
        latest[record["run_id"]] = record
        counts[record["run_id"]] = counts.get(record["run_id"], 0) + 1
    repeated = sorted(rid for rid, n in counts.items() if n > 1)
    notes = [f"run {rid} recorded {counts[rid]} times; the last record is used" for rid in repeated]
    return list(latest.values()), notes


def to_frame(records: list[dict[str, Any]]) -> Any:
    """Flatten records into a DataFrame (``json_normalize``, '.' separators): ``config.model``,
    ``predicted.components.weights``, ``measured.tokens_per_s``...; null sub-objects give NaN columns."""
    import pandas as pd

    if not records:
        return pd.DataFrame({"run_id": pd.Series(dtype=object)})
    return pd.json_normalize(records, sep=".")


def load(path: str | os.PathLike[str]) -> Any:
    """Read a records file or folder into a DataFrame with one row per run.

    Repeated run_ids keep their last record. Warnings (skipped lines, repeated runs) are in
    ``df.attrs["warnings"]``.

    Raises:
        UserError: the path does not exist.
    """
    records, warnings = read_records(path)
    latest, notes = latest_per_run(records)
    df = to_frame(latest)
    df.attrs["warnings"] = warnings + notes
    return df


# ---------------------------------------------------------------------------------------------- environment
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvml_info() -> tuple[str | None, str | None]:
    """(name of GPU 0, driver version) from NVML, or (None, None) without a driver/GPU."""
    try:
        import pynvml
    except ImportError:
        return None, None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded...
        return None, None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        name = None
        if pynvml.nvmlDeviceGetCount() > 0:
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        decode = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731 - old pynvml returns bytes
        return decode(name), decode(driver)
    except Exception:
        return None, None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _torch_cuda(gpu_seen: bool) -> tuple[str | None, str | None]:
    """(device name, CUDA version) from torch: only if torch is already imported or NVML saw a GPU."""
    if "torch" not in sys.modules and not gpu_seen:
        return None, None
    try:
        import torch
    except ImportError:
        return None, None
    cuda = torch.version.cuda
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), cuda
    return None, cuda


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_REPO_DIR, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state() -> tuple[str, bool]:
    """(HEAD commit, dirty) of the lorabench checkout; ("unknown", True) outside a git checkout.

    results/ and reports/ are left out of the dirty check: appending records must not make the next run
    look dirty.
    """
    commit = _git("rev-parse", "HEAD")
    if commit is None:  # e.g. a copy of the tree on a GPU machine: the campaign exports the commit
        return os.environ.get("LORABENCH_GIT_COMMIT", "unknown"), True
    status = _git("status", "--porcelain", "--", ".", ":(exclude)results", ":(exclude)reports")
    return commit.strip(), status is None or bool(status.strip())


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else ``platform.processor()``, else "cpu"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: str = "auto") -> dict[str, Any]:
    """The record's ``env``: device, driver, CUDA and library versions, Python, platform, git state.

    Args:
        device: the run's ``config.device``; "cpu" names the CPU even on a machine with a GPU.

    torch is imported only when it is already loaded or NVML reports a GPU (to read the CUDA version);
    a CPU run reports the CPU model (``/proc/cpuinfo``, else ``platform.processor()``, else "cpu").
    """
    nvml_name, driver = _nvml_info()
    torch_name, cuda = _torch_cuda(gpu_seen=nvml_name is not None and device != "cpu")
    commit, dirty = git_state()
    gpu_name = None if device == "cpu" else (torch_name or nvml_name)
    env: dict[str, Any] = {
        "device_name": gpu_name or _cpu_name(),
        "driver": driver,
        "cuda": cuda,
    }
    env.update({key: _version(dist) for dist, key in _PACKAGES.items()})
    env.update({
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": dirty,
        # 1/5/15-minute load averages: CPU step times on a shared machine depend on them
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    })
    return env
