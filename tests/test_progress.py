"""Sweep progress: done/total, status counts, and an ETA = remaining predicted compute + learned overhead;
the grid is expanded in the BasicSweeper's order from a sweep's multirun.yaml."""

from __future__ import annotations

import pytest

from lorabench.progress import SweepProgress, progress_bar


def test_eta_from_predictions_and_learned_overhead() -> None:
    p = SweepProgress([10.0, 20.0, 30.0, 40.0])
    assert p.eta_s() is None and p.line() == "0/4 | ok 0 oom 0 failed 0 | ETA ?"
    p.finished("ok", 15.0)  # 5 s beyond its prediction: the per-job overhead so far
    assert p.eta_s() == pytest.approx(20 + 30 + 40 + 3 * 5)
    p.finished("oom", 27.0)  # overheads 5 and 7: median 6
    p.skipped()
    assert p.eta_s() == pytest.approx(40 + 1 * 6)
    assert p.line() == "3/4 | ok 1 oom 1 failed 0 skipped 1 | ETA 46.00 s"
    p.finished("failed", 1.0)
    assert p.line().endswith("| done") and "failed 1" in p.line()


def test_progress_bar_handle_disabled_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar("x", enabled=False) as bar:
        bar.update_to(3, 10)
    with progress_bar("x", delay_s=60) as bar:  # finishes before the delay: nothing printed
        bar.update_to(10, 10)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_grid_overrides_in_basic_sweeper_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("hydra")
    from lorabench.sweep_progress import grid_overrides

    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      method: full,lora\n      train.gradient_checkpointing: false,true\n"
        "  overrides:\n    task:\n    - sweep=cpu-time\n    - seed=3\n")
    grid = grid_overrides(tmp_path)
    assert len(grid) == 4
    assert grid[0] == ["method=full", "train.gradient_checkpointing=False", "sweep=cpu-time", "seed=3"]
    assert grid[-1][:2] == ["method=lora", "train.gradient_checkpointing=True"]
