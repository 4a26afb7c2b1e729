"""The runtime's trainable-parameter count equals the planner's prediction, for every catalog model.

Every model is built on the meta device (shapes only), so this covers 405B models in seconds.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lorabench.catalog import load_model, model_names  # noqa: E402
from lorabench.methods import make_config  # noqa: E402
from lorabench.runtime.build import count_trainable, prepare_model  # noqa: E402
from lorabench.specs import TrainSpec  # noqa: E402



CASES: list[tuple[str, dict[str, Any]]] = [
    ("full", {}),
    ("lora", {}),
    ("lora", {"r": 16, "target_modules": "all-linear"}),
    ("qlora", {}),
    ("ia3", {}),
    ("prefix", {}),
    ("prefix", {"prefix_projection": True}),
    ("adapters", {}),
    ("adapters", {"placement": "seq_bn"}),
]


def _case_id(case: tuple[str, dict[str, Any]]) -> str:
    method, knobs = case
    return method + "".join(f"-{k}={v}" for k, v in knobs.items())


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_runtime_count_equals_planner(name: str, case: tuple[str, dict[str, Any]]) -> None:
    planner = pytest.importorskip("lorabench.memory.planner")
    method, knobs = case
    spec = load_model(name)
    if method == "qlora" and spec.is_moe:
        pytest.skip("qlora: the runtime cannot quantize Mixtral's fused expert tensors (UserError)")
    train = TrainSpec(precision="bf16", attention="eager" if spec.model_type == "gemma2" else "sdpa")
    cfg = make_config(method, knobs)
    model = prepare_model(spec, cfg, train, device="meta")
    assert count_trainable(model) == planner.predict(spec, cfg, train).trainable_params
