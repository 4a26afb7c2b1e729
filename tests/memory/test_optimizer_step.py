"""The optimizer step's temporaries per AdamW implementation and the tied-embedding gradient transient,
against the fake-tensor trace (the real torch optimizers and autograd engine)."""

from __future__ import annotations

import pytest

from lorabench.catalog import load_model
from lorabench.memory.planner import predict
from lorabench.methods import make_config
from lorabench.specs import OptimizerSpec, TrainSpec

pytest.importorskip("torch")


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("impl", ["foreach", "fused", "for-loop"])
def test_optimizer_phase_peak_matches_trace(method: str, impl: str) -> None:
    from lorabench.runtime.trace import trace

    # A short sequence keeps the peak in the optimizer step, where the implementations differ.
    spec, cfg = load_model("tiny-llama"), make_config(method)
    train = TrainSpec(micro_batch_size=1, seq_len=8, precision="fp32", adamw_impl=impl)
    pred, traced = predict(spec, cfg, train), trace(spec, cfg, train)
    # Within 5 KiB: the traced step also holds the per-parameter step counters (a few bytes each).
    assert abs(pred.phase_peaks["optimizer"] - traced.phase_peak_bytes["optimizer"]) <= 5 * 1024
    if impl == "foreach" and method == "full":  # the peak is the step: its temporary is its own component
        assert pred.phase == "optimizer" and pred.components["optimizer_temp"] == pred.components["optimizer"] // 2
    if impl == "fused":
        assert pred.phase_peaks["optimizer"] == pred.phase_peaks["backward_end"]


# SGD keeps no state: the end of backward is the peak (8-bit optimizers too, at sizes where bitsandbytes
# keeps 8-bit states: tensors of 4,096 elements or more, which tiny models lack).
@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum"])
def test_tied_embedding_gradient_transient_is_the_backward_peak(optimizer: str) -> None:
    from lorabench.runtime.trace import trace

    spec = load_model("tiny-qwen2")
    assert spec.tie_word_embeddings
    train = TrainSpec(micro_batch_size=1, seq_len=2, precision="bf16", optimizer=OptimizerSpec(optimizer))
    pred, traced = predict(spec, make_config("full"), train), trace(spec, make_config("full"), train)
    assert pred.phase_peaks["backward_end"] == max(pred.phase_peaks.values())
    assert abs(pred.peak_allocated_bytes - traced.peak_bytes) <= 0.01 * traced.peak_bytes


def test_hf_optim_aliases_resolve() -> None:
    from lorabench.specs import OPTIMIZER_ALIASES, OPTIMIZER_NAMES, resolve_optimizer

    assert resolve_optimizer("adamw_torch_fused") == ("adamw", "fused")
    assert resolve_optimizer("paged_adamw_32bit") == ("paged_adamw", None)
    assert all(resolve_optimizer(a)[0] in OPTIMIZER_NAMES for a in OPTIMIZER_ALIASES)
