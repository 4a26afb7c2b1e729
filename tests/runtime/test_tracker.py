"""MemoryTracker: exact live-storage accounting on hand-made op sequences, real and fake tensors."""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from lorabench.memory.categories import PHASES, TRACE_CATEGORIES  # noqa: E402
from lorabench.runtime.step import make_optimizer, train_steps  # noqa: E402
from lorabench.runtime.tracker import MemoryTracker  # noqa: E402

F32 = 4


def _modes() -> list[tuple[str, object]]:
    return [("real", None), ("fake", FakeTensorMode())]


@pytest.mark.parametrize("label, fake_mode", _modes())
def test_hand_made_sequence_exact_peak(label: str, fake_mode: FakeTensorMode | None) -> None:
    tracker = MemoryTracker()
    with fake_mode or contextlib.nullcontext(), tracker:
        a = torch.ones(1000)                     # 4000 B
        view = a.view(10, 100)                   # same storage: +0
        assert tracker.current_bytes == 1000 * F32
        b = torch.mul(view, view)                # +4000
        c = torch.empty(250, dtype=torch.float64)  # +2000
        assert tracker.current_bytes == 10_000
        del a                                    # the view still holds a's storage
        assert tracker.current_bytes == 10_000
        del view                                 # now a's storage is freed
        assert tracker.current_bytes == 6000
        d = torch.cat([b.view(-1), b.view(-1)])  # +8000 -> 14000, the peak
        del b, c, d
        e = torch.zeros(10, dtype=torch.bfloat16)  # 20 B
    assert tracker.current_bytes == 20
    assert tracker.peak_bytes == 14_000
    assert tracker.peak_breakdown == {**dict.fromkeys(TRACE_CATEGORIES, 0), "activations": 14_000}
    assert tracker.phase_peak_bytes["setup"] == 14_000
    del e


def test_storage_counted_once_across_views_and_registration() -> None:
    weight = torch.zeros(64, 64)
    tracker = MemoryTracker()
    tracker.track_tensor(weight, "weights_frozen")
    tracker.track_tensor(weight.t(), "weights_frozen")   # a view of a registered storage adds nothing
    tracker.track_tensor(weight[:8], "weights_frozen")
    assert tracker.current_bytes == 64 * 64 * F32
    with tracker:
        halves = torch.split(weight, 32)                # views: no new storage
        assert tracker.current_bytes == 64 * 64 * F32
    del halves
    assert tracker.breakdown["weights_frozen"] == 64 * 64 * F32


def test_in_place_resize_is_followed() -> None:
    tracker = MemoryTracker()
    with tracker:
        buf = torch.empty(0)
        assert tracker.current_bytes == 0
        buf.resize_(100)
        assert tracker.current_bytes == 400
        buf.resize_(0)                          # keeps its 400-byte storage
        torch.add(torch.ones(200), 1, out=buf)  # out= grows the storage to 200 floats
    assert tracker.peak_bytes == 800 + 800  # ones(200) temporary alive while buf grows
    del buf
    assert tracker.current_bytes == 0


def test_retag_corrects_the_peak_breakdown_only_for_storages_alive_at_the_peak() -> None:
    tracker = MemoryTracker()
    with tracker:
        early = torch.ones(100)                 # alive at the peak
        temp = torch.ones(300)
        del temp                                # peak was 1600 with early + temp
        late = torch.ones(50)                   # born after the peak
    assert tracker.peak_bytes == 1600
    tracker.track_tensor(early, "gradients")
    tracker.track_tensor(late, "optimizer")
    assert tracker.peak_breakdown["gradients"] == 400
    assert tracker.peak_breakdown["activations"] == 1200
    assert tracker.peak_breakdown["optimizer"] == 0
    assert sum(tracker.peak_breakdown.values()) == tracker.peak_bytes
    assert tracker.breakdown == {**dict.fromkeys(TRACE_CATEGORIES, 0), "gradients": 400, "optimizer": 200}


class _Quant(nn.Module):
    is_quantized = True

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("absmax", torch.ones(16))           # fp32, quantized by its module's flag
        self.register_buffer("codes", torch.zeros(32, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.ones(2), requires_grad=False)  # a 16/32-bit param stays a weight


def test_track_model_categories_and_patterns() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4), _Quant())
    model[0].requires_grad_(False)
    model[1].register_buffer("scale", torch.ones(4))
    model[1].register_buffer("packed", torch.zeros(10, dtype=torch.uint8))   # uint8 anywhere: quantized
    model[1].register_buffer("qconst", torch.ones(3))
    tracker = MemoryTracker(quantized_patterns=["*.qconst"])
    tracker.track_model(model)
    tracker.track_model(model)  # idempotent
    assert tracker.breakdown == {
        "weights_frozen": (64 + 8 + 4 + 2) * F32,      # frozen linear, the plain buffer, _Quant's bias
        "weights_trainable": (32 + 4) * F32,
        "quantized": 10 + 3 * F32 + 16 * F32 + 32,
        "gradients": 0, "optimizer": 0, "activations": 0,
    }


def test_bitsandbytes_quant_state_is_quantized() -> None:
    bnb_backend = pytest.importorskip("lorabench.quant.bnb_backend")
    layer = bnb_backend.bnb_linear4bit_from_linear(nn.Linear(128, 64).to(torch.bfloat16))
    state = layer.weight.quant_state
    tracker = MemoryTracker()
    tracker.track_model(layer)
    nested = state.state2
    expected = (128 * 64 // 2 + state.absmax.numel() + state.code.numel() * F32 + state.offset.numel() * F32
                + nested.absmax.numel() * F32 + nested.code.numel() * F32)
    assert tracker.breakdown["quantized"] == expected
    assert tracker.breakdown["weights_frozen"] == 64 * 2  # the bf16 bias


@pytest.mark.parametrize("label, fake_mode", _modes())
def test_gradients_and_optimizer_state_are_categorized(label: str, fake_mode: FakeTensorMode | None) -> None:
    tracker = MemoryTracker()
    with fake_mode or contextlib.nullcontext():
        model = nn.Linear(256, 256, bias=False)
        param_bytes = 256 * 256 * F32
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        tracker.track_model(model)
        tracker.track_optimizer(optimizer)
        x = torch.ones(4, 256)
        tracker.track_tensor(x)
        with tracker:
            for _ in range(2):
                with tracker.phase("forward"):
                    loss = model(x).square().sum()
                with tracker.phase("backward"):
                    loss.backward()
                del loss
                assert tracker.breakdown["gradients"] == param_bytes   # retagged by the post-accumulate hook
                with tracker.phase("optimizer"):
                    optimizer.step()
                    tracker.track_optimizer_state()
                    optimizer.zero_grad(set_to_none=True)
        tracker.close()
    # AdamW foreach: weights + grads + (m, v, step) + one exp_avg_sq.sqrt() temporary of state size.
    assert tracker.peak_phase == "optimizer"
    assert tracker.peak_breakdown["weights_trainable"] == param_bytes
    assert tracker.peak_breakdown["gradients"] == param_bytes
    assert tracker.peak_breakdown["optimizer"] == 2 * param_bytes + F32   # m, v and a 0-dim fp32 step
    assert tracker.peak_breakdown["activations"] == param_bytes + 4 * 256 * F32
    assert sum(tracker.peak_breakdown.values()) == tracker.peak_bytes
    assert tracker.breakdown["gradients"] == 0  # set_to_none freed them


def test_train_steps_records_phases_and_to_dict() -> None:
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            self.head = nn.Linear(8, 16)

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> object:
            logits = self.head(self.emb(input_ids))
            loss = nn.functional.cross_entropy(logits.view(-1, 16), labels.view(-1))
            return type("Out", (), {"loss": loss, "logits": logits})()

    model = TinyLM()
    batch = torch.randint(0, 16, (2, 5))
    tracker = MemoryTracker()
    losses = train_steps(model, batch, make_optimizer(model.parameters(), "sgd_momentum", 0.1), 2, tracker=tracker)
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    record = tracker.to_dict()
    assert set(record) == {"components", "peak_bytes", "phase"}
    assert set(record["components"]) == set(TRACE_CATEGORIES)
    assert record["phase"] in PHASES
    assert sum(record["components"].values()) == record["peak_bytes"]
    assert record["components"]["optimizer"] == sum(p.numel() for p in model.parameters()) * F32  # momentum
    assert [name for name, _ in tracker.timeline][:3] == ["forward", "setup", "backward"]


def test_unknown_phase_and_category_raise() -> None:
    tracker = MemoryTracker()
    with pytest.raises(ValueError, match="phase"):
        tracker.set_phase("warmup")
    with pytest.raises(ValueError, match="category"):
        tracker.track_tensor(torch.ones(1), "logits")


def test_close_stops_following_frees() -> None:
    tracker = MemoryTracker()
    with tracker:
        x = torch.ones(10)
    tracker.close()
    del x
    assert tracker.current_bytes == 40  # no longer followed after close


def test_reset_peak_restarts_from_the_live_bytes() -> None:
    tracker = MemoryTracker()
    with tracker:
        a = torch.ones(100)
        b = torch.ones(100)
        del b
        tracker.reset_peak()
        assert (tracker.peak_bytes, tracker.phase_peak_bytes["setup"]) == (400, 400)
        c = torch.ones(10)
    assert tracker.peak_bytes == 440
    assert [row.nbytes for row in tracker.live_storages()] == [400, 40]
    del a, c
