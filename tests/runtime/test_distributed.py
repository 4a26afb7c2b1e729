"""Multi-rank jobs: torchrun launch, per-rank records, bad worlds, and the planner per rank (CPU, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from lorabench.catalog import load_model
from lorabench.memory.planner import predict
from lorabench.methods import make_config
from lorabench.runtime import dist_launch
from lorabench.runtime.dist_launch import check_world, merge_ranks, run_distributed_subprocess, torchrun_command
from lorabench.specs import TrainSpec


def payload(method: str = "full", sharding: str = "zero3", optimizer: str = "adamw", **train: object) -> dict:
    """A 2-rank job payload for tiny-llama on the CPU, as lorabench.sweep builds it."""
    spec = load_model("tiny-llama")
    train_cfg = {"micro_batch_size": 2, "seq_len": 32, "precision": "fp32", "gradient_checkpointing": False,
                 "attention": "sdpa", "optimizer": optimizer, "grad_accum_steps": 1, "num_gpus": 2,
                 "sharding": sharding, "master_weights": False, **train}
    config = {"model": spec.name, "method": make_config(method).to_dict(), "train": train_cfg, "device": "cpu",
              "gpu": None, "memory_cap_bytes": None, "warmup_steps": 2, "timed_steps": 1, "seed": 0}
    return {"config": config, "hf_config": dict(spec.hf_config), "lr": 1e-3, "trace": False, "num_threads": 1,
            "sampler_hz": 200.0, "gpu": None}


def _no_rank_left(tmp_marker: str) -> bool:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return tmp_marker not in out


# ---------------------------------------------------------------------------------------------- fast checks
def test_torchrun_command_is_torchs_own_launcher_with_a_rendezvous_timeout(tmp_path: Path) -> None:
    cmd = torchrun_command(4, tmp_path / "p.json", tmp_path / "out", tmp_path / "logs", join_timeout_s=30)
    text = " ".join(cmd)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node 4" in text and "--nnodes 1" in text and "--max-restarts 0" in text
    assert "--rdzv-backend c10d --rdzv-endpoint localhost:0 --rdzv-conf join_timeout=30" in text
    assert cmd[-6:-4] == ["-m", "lorabench.runtime.distributed"]


def test_bad_worlds_are_refused_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_world(1, "none", "cpu") is None
    assert "needs train.num_gpus > 1" in check_world(1, "zero3", "cpu")
    monkeypatch.setattr(dist_launch, "visible_devices", lambda device: 2)
    assert check_world(2, "zero2", "cpu") is None
    line = check_world(8, "zero3", "cuda")
    assert "exceeds the 2 CUDA devices" in line and "train.num_gpus=2" in line and "\n" not in line
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    assert "multi-node" in check_world(2, "zero3", "cuda")


def test_merge_ranks_names_a_dead_rank_by_its_last_line(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    log.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: boom on rank 1\n")
    rank0 = {"status": "ok", "error": None, "env": {"device_name": "cpu"},
             "measured": {"tracker": {"peak_bytes": 10, "components": {}, "phase": "backward"},
                          "torch_max_allocated_bytes": None}}
    out = merge_ranks({0: rank0}, 2, {1: log}, tmp_path / "job.log", 1, 0.1)
    assert out.status == "failed" and "rank 1 died: RuntimeError: boom on rank 1" in out.error
    assert out.measured["per_rank_peak_bytes"] == [10, None]
    both = merge_ranks({0: rank0, 1: dict(rank0, status="oom", error="cap")}, 2, {}, log, 0, 0.1)
    assert both.status == "oom" and both.measured["per_rank_peak_bytes"] == [10, 10]


@pytest.mark.parametrize("overrides, needle", [
    (["train.num_gpus=4096", "train.sharding=zero3"], "exceeds the"),
    (["train.num_gpus=1", "train.sharding=zero2"], "zero2"),
])
def test_the_runner_refuses_a_bad_world_before_launching(tmp_path: Path, overrides: list[str], needle: str) -> None:
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([os.sys.executable, "-m", "lorabench.sweep", "device=cpu", *overrides,
                          f"results_dir={tmp_path}", "sweep_name=t", f"hydra.run.dir={tmp_path}/h"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "t" / "records.jsonl").exists()


# ---------------------------------------------------------------------------------------------- real ranks
@pytest.mark.slow
def test_zero3_ranks_measured_and_predicted_within_3_percent(tmp_path: Path) -> None:
    """Two real FSDP2 ranks (gloo): one record-shaped outcome with each rank's tracker peak, each within 3%
    of the planner's per-GPU prediction for exactly this config."""
    p = payload("full", "zero3")
    out = run_distributed_subprocess(p, 2, timeout_s=240, join_timeout_s=60, log_dir=tmp_path)
    assert out.status == "ok", out.error
    m = out.measured
    assert m["world_size"] == 2 and len(m["per_rank"]) == 2
    for tracker in m["per_rank"]:
        assert sum(tracker["components"].values()) == tracker["peak_bytes"]
    train = TrainSpec.from_record(p["config"]["train"])
    predicted = predict(load_model("tiny-llama"), make_config("full"), train).peak_allocated_bytes
    for peak in m["per_rank_peak_bytes"]:
        assert abs(predicted - peak) / peak < 0.03, (predicted, m["per_rank_peak_bytes"])
    # Sharded for real: each rank holds about half of the trainable weights between steps.
    single = predict(load_model("tiny-llama"), make_config("full"), TrainSpec(precision="fp32"))
    assert m["per_rank"][0]["components"]["optimizer"] < 0.6 * single.components["optimizer"]


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_job_with_its_line_and_leaves_nothing(tmp_path: Path) -> None:
    p = payload("lora", "zero1", optimizer="adamw_8bit")  # every rank refuses it after building the model
    t0 = time.perf_counter()
    out = run_distributed_subprocess(p, 2, timeout_s=240, join_timeout_s=60, log_dir=tmp_path)
    assert out.status == "failed" and "zero1 shards torch optimizers only" in out.error, out.error
    assert "rank 0 died" in out.error and time.perf_counter() - t0 < 120
    assert _no_rank_left("lorabench-dist-")


def test_a_world_that_cannot_assemble_fails_fast_with_one_line(tmp_path: Path) -> None:
    out = run_distributed_subprocess(payload(), 1, timeout_s=120, join_timeout_s=2, log_dir=tmp_path, nnodes=2)
    assert out.status == "failed" and out.wall_s < 60
    assert out.error == "no rank started: torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError"
    assert _no_rank_left("lorabench-dist-")


# ---------------------------------------------------------------------------------------------- SLURM
def test_slurm_multigpu_launcher_submits_one_task_holding_all_gpus_and_runs_torchrun_in_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The sbatch script submitit writes for hydra/launcher=slurm_multigpu, and the torchrun command the job
    then runs inside the allocation: one task on one node with train.num_gpus GPUs, as many ranks."""
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf
    from submitit import AutoExecutor
    from submitit.slurm.slurm import SlurmExecutor

    from lorabench.sweep import build_specs

    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm_multigpu", "train.num_gpus=8", "device=cuda",
                                           "train.sharding=zero3", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    # The submitit plugin's own mapping of launcher settings to executor parameters (launch()).
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun on this machine
    executor = AutoExecutor(cluster="slurm", folder=tmp_path, slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("_target_", "submitit_folder", "max_num_timeout")})
    sbatch = executor._executor._make_submission_file_text("python -m lorabench.sweep", "uid")
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu"):
        assert line in sbatch, sbatch
    train = build_specs(cfg).train
    cmd = " ".join(torchrun_command(train.num_gpus, tmp_path / "p", tmp_path / "o", tmp_path / "l",
                                    join_timeout_s=float(cfg.dist_timeout_s)))
    assert "-m torch.distributed.run --nnodes 1 --nproc-per-node 8" in cmd
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(8))))
    assert check_world(train.num_gpus, train.sharding, "cuda") is None
