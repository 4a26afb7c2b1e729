"""The step-time fit recovers efficiencies from records the model itself generated, and splits by configuration."""

from __future__ import annotations

import dataclasses

import pytest

from lorabench.catalog import load_gpu, load_model
from lorabench.methods import make_config
from lorabench.specs import TrainSpec
from lorabench.steptime import calibration, fit
from lorabench.steptime.model import predict_time

CPU = load_gpu("cpu-epyc-1t")


def _runs(cal: calibration.TimeCalibration) -> list[fit.Run]:
    out = []
    for model in ("tiny-llama", "qwen2.5-0.5b"):
        spec = load_model(model)
        for method in ("full", "lora", "qlora", "ia3"):
            for ckpt in (False, True):
                for seq in (64, 256):
                    train = TrainSpec(micro_batch_size=2, seq_len=seq, gradient_checkpointing=ckpt)
                    cfg = make_config(method)
                    t = predict_time(spec, cfg, train, CPU, cal).step_time_s
                    out.append(fit.Run(f"{model}{method}{ckpt}{seq}", spec, cfg, train, t, 1))
    return out


def test_fit_recovers_a_known_calibration() -> None:
    defaults = calibration.load(None)
    truth = dict(defaults.efficiency)
    for group, value in zip(fit.GROUPS, (0.4, 0.25, 0.15, 0.5)):
        truth.update({c: value for c in group})
    known = dataclasses.replace(defaults, efficiency=truth, kernel_overhead_s=20e-6, forward_op_overhead_s=30e-6)
    got = fit.fit(_runs(known), CPU, defaults)
    for group, value in zip(fit.GROUPS, (0.4, 0.25, 0.15, 0.5)):
        assert got.efficiency[group[0]] == pytest.approx(value, rel=1e-4)
    assert got.kernel_overhead_s == pytest.approx(20e-6, rel=1e-4)
    assert got.forward_op_overhead_s == pytest.approx(30e-6, rel=1e-4)
    assert max(abs(e) for _, _, e in fit.errors(_runs(known), CPU, got)) < 1e-6


def test_split_keeps_repeats_of_a_config_together() -> None:
    base = {"model": "tiny-llama", "method": {"method": "lora"}, "train": {"seq_len": 64}, "device": "cpu"}
    keys = {fit._config_key({**base, "seed": s}) for s in range(5)}
    assert len(keys) == 1
    runs = _runs(calibration.load(None))
    a, b = fit.split(runs)
    assert a and b and len(a) + len(b) == len(runs) and not {r.key for r in a} & {r.key for r in b}


def test_a_fitted_calibration_beats_the_device_entrys_own_op_cost() -> None:
    """plan on the CPU entry uses conf/calibration/time-<cpu>.yaml when it exists (the fitted per-op cost),
    the same prediction the validation report scores."""
    spec, cfg, train = load_model("tiny-llama"), make_config("lora"), TrainSpec(micro_batch_size=2, seq_len=128)
    assert calibration.is_fitted(CPU.name)
    implicit = predict_time(spec, cfg, train, CPU).step_time_s
    assert implicit == pytest.approx(predict_time(spec, cfg, train, CPU, calibration.load(CPU.name)).step_time_s)
