"""The per-rank section of a report (lorabench.report.ranks), on hand-made multi-rank records."""

from __future__ import annotations

from lorabench.report.ranks import per_rank_section


def _record(sharding: str, peaks: list[int], predicted: int) -> dict:
    comps = {"weights": 100, "activations": predicted - 100, "cuda_context": 5, "allocator_slack": 7}
    tracker = {"components": {"weights_frozen": 100, "activations": peaks[0] - 100}, "peak_bytes": peaks[0],
               "phase": "backward"}
    return {"status": "ok",
            "config": {"model": "tiny-llama", "method": {"method": "lora"},
                       "train": {"sharding": sharding, "num_gpus": len(peaks), "gradient_checkpointing": False,
                                 "precision": "fp32"}},
            "predicted": {"peak_allocated_bytes": predicted, "components": comps,
                          "phase_peaks": {"backward": predicted, "optimizer": 1}},
            "measured": {"per_rank_peak_bytes": peaks, "per_rank": [tracker] * len(peaks)}}


def test_per_rank_section_counts_ranks_within_the_bound_and_shows_the_worst() -> None:
    lines = per_rank_section([_record("zero3", [1000, 1000], 1010), _record("none", [1000, 900], 1000),
                              {"status": "ok", "measured": {"tracker": {}}}])
    text = "\n".join(lines)
    assert "1 of 2 runs within ±3% on every rank; worst 11.11%." in text
    assert "| zero3      | 1      | 2       | 1.00%" in text
    assert "+1.00% / +1.00%" in text and "+0.00% / +11.11%" in text
    assert "### Categories of the worst run" in text and "lora, none, ckpt off, fp32:" in text


def test_no_multi_rank_record_no_section() -> None:
    assert per_rank_section([{"status": "ok", "measured": {"tracker": {"peak_bytes": 1}}}]) == []
