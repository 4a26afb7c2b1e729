"""Shared fixtures; GPU tests are skipped without CUDA."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


# Without a GPU, Triton kernels (tests marked `triton`) run in Triton's CPU interpreter, which must be chosen
# before triton is first imported.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_cli_expecting_ok_or_one_line(argv: list[str], capsys: pytest.CaptureFixture[str],
                                     codes: tuple[int, ...] = (0, 2)) -> str:
    """Run the CLI; it must exit with one of ``codes`` (0, or 2 with one line on stderr and no traceback).
    Returns stderr."""
    from lorabench.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    _, err = capsys.readouterr()
    assert code in codes, err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err
