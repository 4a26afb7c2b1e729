"""The step-time model's op counts (the fixed per-op cost that dominates small models) against the real stack:
every aten call of one training step of tiny-llama (transformers + lorabench's methods + torch AdamW foreach),
counted with a TorchDispatchMode, within 25% of the model's count."""

from __future__ import annotations

import collections

import pytest

torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from lorabench.catalog import load_gpu, load_model  # noqa: E402
from lorabench.methods import make_config  # noqa: E402
from lorabench.specs import TrainSpec  # noqa: E402
from lorabench.steptime.model import pieces  # noqa: E402


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.n += 1
        return func(*args, **(kwargs or {}))


def _counted_and_predicted(method: str, ckpt: bool, knobs: dict) -> tuple[int, float]:
    """(aten calls of one training step with optimizer state, the model's kernel count)."""
    from lorabench.runtime.build import prepare_model
    from lorabench.runtime.step import make_optimizer, synthetic_batch, train_steps

    torch.set_num_threads(1)  # tiny tensors; two threads fighting for shared cores are ~100x slower
    spec = load_model("tiny-llama")
    train = TrainSpec(micro_batch_size=2, seq_len=32, precision="bf16", gradient_checkpointing=ckpt)
    cfg = make_config(method, knobs)
    model = prepare_model(spec, cfg, train, device="cpu", seed=0)
    opt = make_optimizer(model.parameters(), train.optimizer, 1e-4, foreach=True)
    batch = synthetic_batch(spec.vocab_size, 2, 32, "cpu", 0)
    train_steps(model, batch, opt, 1)  # optimizer state exists from here on
    counter = _Count()
    with counter:
        train_steps(model, batch, opt, 1)
    return counter.n, sum(p.work.kernels for p in pieces(spec, cfg, train, load_gpu("cpu-epyc-1t")))


@pytest.mark.parametrize("method, ckpt, knobs", [("full", False, {}), ("lora", True, {}), ("qlora", False, {}),
                                                 ("ia3", True, {}), ("qlora", False, {"use_dora": True})])
def test_op_count_within_25_percent(method: str, ckpt: bool, knobs: dict) -> None:
    counted, predicted = _counted_and_predicted(method, ckpt, knobs)
    assert predicted == pytest.approx(counted, rel=0.25)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_dora_adds_the_ops_it_runs(method: str) -> None:
    """The ops use_dora adds (the weight norm per adapted layer, a 4-bit weight's extra dequantization)."""
    lora_n, lora_p = _counted_and_predicted(method, False, {})
    dora_n, dora_p = _counted_and_predicted(method, False, {"use_dora": True})
    assert dora_p - lora_p == pytest.approx(dora_n - lora_n, rel=0.25)
