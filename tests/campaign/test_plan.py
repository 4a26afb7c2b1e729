"""The campaign's priority order, probe picking and clock (lorabench.campaign.plan / clock), no jobs run."""

from __future__ import annotations

import itertools

import pytest

from lorabench.campaign import plan
from lorabench.campaign.clock import Clock

CAMPAIGN = {"validate_sweep": "gpu-validate", "models": ["small", "big"], "methods": ["full", "lora", "qlora"],
            "methods_by_model": {"big": ["qlora"]}, "micro_batches": [1, 4], "seq_lens": [512, 2048],
            "checkpointing": [False, True]}


def test_every_prefix_of_four_shapes_is_a_balanced_half_fraction() -> None:
    shapes = plan.balanced_shapes([1, 4], [512, 2048], [False, True])
    assert sorted(shapes) == sorted(itertools.product([1, 4], [512, 2048], [False, True]))
    for half in (shapes[:4], shapes[4:]):
        for i, j in itertools.combinations(range(3), 2):  # each factor and each pair of factors balanced
            assert sorted({s[i] for s in half}) == sorted({s[i] for s in shapes})
            assert len({(s[i], s[j]) for s in half}) == 4
    with pytest.raises(ValueError, match="2 x 2 x 2"):
        plan.balanced_shapes([1, 2, 4], [512, 2048], [False, True])


def test_validation_order_covers_every_method_first_then_shapes_then_models() -> None:
    jobs = plan.validation_jobs(CAMPAIGN)
    assert len(jobs) == 3 * 8 + 8 and all(j.stage == "validate" and j.sweep_name == "gpu-validate" for j in jobs)
    first = [dict(o.split("=", 1) for o in j.overrides) for j in jobs[:3]]
    assert [f["method"] for f in first] == ["full", "lora", "qlora"] and {f["model"] for f in first} == {"small"}
    assert {f["train.seq_len"] for f in first} == {"512"} and first[0]["train.gradient_checkpointing"] == "false"
    assert all("model=small" in j.overrides for j in jobs[:24])
    assert all(j.overrides[:2] == ("model=big", "method=qlora") for j in jobs[24:])
    assert jobs[0].label() == "model=small method=full micro_batch_size=1 seq_len=512 gradient_checkpointing=false"
    halves = plan.validation_jobs({**CAMPAIGN, "rounds": 2})
    assert sorted(halves, key=str) == sorted(jobs, key=str)
    models = [dict(o.split("=", 1) for o in j.overrides)["model"] for j in halves]
    assert models == ["small"] * 12 + ["big"] * 4 + ["small"] * 12 + ["big"] * 4  # every model's half first


def test_extra_jobs_follow_the_first_round() -> None:
    extra = [["model=moe", "method=lora", "method.target_parameters=experts"]]
    jobs = plan.validation_jobs({**CAMPAIGN, "rounds": 2, "extra_jobs": extra})
    assert len(jobs) == 3 * 8 + 8 + 1 and jobs[16].overrides == tuple(extra[0])
    assert all("model=moe" not in j.overrides for j in jobs[:16] + jobs[17:])


def test_the_gpu_preset_validates_expert_lora_on_mixtral() -> None:
    from pathlib import Path

    import yaml

    preset = yaml.safe_load((Path(__file__).parents[2] / "conf/sweep/gpu-campaign.yaml").read_text())["campaign"]
    assert ["model=mixtral-8x7b", "method=lora", "method.target_parameters=experts",
            "train.gradient_checkpointing=true"] in preset["extra_jobs"]


def test_probes_take_the_nearest_config_on_each_side_of_every_cap_outside_the_margin() -> None:
    cands = [plan.Candidate((f"c{i}",), level) for i, level in enumerate([90, 96, 99, 101, 104, 110, 200])]
    picks = plan.pick_probes(cands, [100, 105], margin=0.03)
    assert [(c.overrides[0], cap) for c, cap in picks] == [("c1", 100), ("c4", 100), ("c3", 105), ("c5", 105)]
    jobs = plan.probe_jobs(picks, "gpu-probes")
    assert jobs[0].overrides == ("c1", "memory_cap_bytes=100") and jobs[0].stage == "probes"
    assert plan.pick_probes(cands, [10], margin=0.03)[0][0].overrides == ("c0",)  # nothing below: above only


def test_card_caps_leave_the_cuda_context_out() -> None:
    from lorabench.catalog import load_gpu

    assert plan.card_caps_bytes(["a100-80gb"], 1 << 29) == [load_gpu("a100-80gb").memory_bytes - (1 << 29)]


def test_clock_keeps_the_later_stages_reserves_and_learns_the_overhead() -> None:
    clock = Clock(budget_s=500, reserves_s={"probes": 100, "perf": 80}, finish_s=20, started_at=0.0,
                  overhead_guess_s=3.0)
    order = ("validate", "probes", "perf")
    assert clock.hard_end_s() == 480
    assert [clock.deadline_s(s, order) for s in order] == [300, 400, 480]
    assert clock.estimate_s(10.0) == pytest.approx(18.0)  # 1.5 x compute + the guessed overhead
    clock.observe(wall_s=12.0, compute_s=10.0)
    clock.observe(wall_s=11.0, compute_s=10.0)
    assert clock.estimate_s(10.0) == pytest.approx(16.5)
    clock.started_at = __import__("time").time() - 290  # 290 s into the command
    assert clock.may_start(5.0, 300) and not clock.may_start(16.5, 300)
    assert 189 <= clock.job_timeout_s(600) <= 190 and clock.job_timeout_s(60) == 60


def test_the_gpu_preset_plans_and_every_job_passes_the_runners_checks() -> None:
    """What the device command plans before running anything (as on an H200, without touching a GPU here)."""
    import time
    from pathlib import Path

    from hydra import initialize_config_dir

    from lorabench.campaign import run
    from lorabench.catalog import load_gpu
    from lorabench.sweep import CONF_DIR

    settings = run.Settings("gpu-campaign", Path("/nonexistent"), Path("/nonexistent"), 510, time.time())
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        campaign = run.campaign_node(settings)
        jobs = run.plan_jobs(settings, campaign, "cuda", load_gpu("h200-141gb"))
        checked = run.check_all(settings, jobs)
    validate = [j for j in jobs if j.stage == "validate"]
    probes = [j for j in jobs if j.stage == "probes"]
    assert len(validate) == 3 * 6 * 8 + 8 + 9 and len(checked) == len(jobs)  # + the Mixtral and recipe extra jobs
    assert validate[0].overrides[:2] == ("model=qwen2.5-0.5b", "method=full")
    caps = [int(dict(o.split("=", 1) for o in j.overrides)["memory_cap_bytes"]) for j in probes]
    assert len(probes) == 10 and len(set(caps)) == 5  # a config below and one above each emulated card
    assert all(cfg.train.warmup_steps == 2 and cfg.train.timed_steps == 5 for _, cfg, _ in checked)
