"""--explain prints the planner's own terms: the labelled parts of each component sum to it exactly."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lorabench.catalog import load_model
from lorabench.memory.explain import explain
from lorabench.memory.planner import predict
from lorabench.methods import METHOD_NAMES, get, make_config
from lorabench.specs import OptimizerSpec, TrainSpec
from lorabench.units import gib

DYNAMIC = ("gradients", "optimizer_temp", "activations", "logits")


@settings(max_examples=60, deadline=None)
@given(model=st.sampled_from(["7b", "70b", "llama-3.1-8b", "gpt2", "qwen2.5-0.5b", "mixtral-8x7b"]),
       method=st.sampled_from(METHOD_NAMES), ckpt=st.booleans(), batch=st.integers(1, 8),
       seq=st.sampled_from([128, 512, 1024]),
       optimizer=st.sampled_from(["adamw", "sgd", "adamw_8bit", "paged_adamw"]),
       impl=st.sampled_from(["foreach", "fused", "for-loop"]))
def test_parts_sum_to_every_component(model: str, method: str, ckpt: bool, batch: int, seq: int,
                                      optimizer: str, impl: str) -> None:
    spec = load_model(model)
    train = TrainSpec(micro_batch_size=batch, seq_len=seq, gradient_checkpointing=ckpt,
                      precision=get(method).default_precision, optimizer=OptimizerSpec(optimizer), adamw_impl=impl)
    pred = predict(spec, make_config(method), train)
    for name, value in pred.components.items():
        parts = pred.parts[name]
        assert sum(v for _, v in parts) == value, name
        if name in DYNAMIC:  # what changes with the peak moment is always labelled
            assert all(label for label, _ in parts), (name, parts)
    rows = {r["component"]: r for r in explain(spec, make_config(method), train, pred)}
    for name in DYNAMIC:
        assert rows[name]["GiB"] == gib(pred.components[name], 3)
        if pred.components[name]:
            assert "MiB" in rows[name]["formula"] and pred.peak_moment in rows[name]["formula"]
        else:
            assert rows[name]["formula"].startswith("0")


def test_70b_qlora_gradients_row_is_the_top_layers() -> None:
    pred = predict(load_model("70b"), make_config("qlora"), TrainSpec())
    row = next(r for r in explain(load_model("70b"), make_config("qlora"), TrainSpec(), pred)
               if r["component"] == "gradients")
    assert pred.peak_moment == "backward_top_layer" and "top layer's parameter gradients" in row["formula"]
