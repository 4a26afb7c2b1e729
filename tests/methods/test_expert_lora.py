"""LoRA on Mixtral's fused experts and router (``target_parameters``): lorabench's ParamLora against PEFT's
ParamWrapper (trainable counts, logits, gradients, adapter files), and the planner against fake-tensor traces
of both stacks."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from lorabench.catalog import load_model  # noqa: E402
from lorabench.errors import UserError  # noqa: E402
from lorabench.memory.planner import predict  # noqa: E402
from lorabench.methods import make_config  # noqa: E402
from lorabench.methods.lora import layer as lora_layer  # noqa: E402
from lorabench.runtime.build import build_model, prepare_model  # noqa: E402
from lorabench.runtime.peft_stack import build_peft_model  # noqa: E402
from lorabench.runtime.trace import trace  # noqa: E402
from lorabench.specs import TrainSpec  # noqa: E402

ALL_RAW = "experts,mlp.gate.weight"


def _cfg(targets: str = ALL_RAW, **kw: Any) -> Any:
    return make_config("lora", {"r": 4, "lora_alpha": 8, "target_parameters": targets, **kw})


def _pair(train: TrainSpec, cfg: Any) -> tuple[Any, Any]:
    """lorabench's and PEFT's models on the same random base, lorabench's adapters copied into PEFT's."""
    spec = load_model("tiny-mixtral")
    ours = prepare_model(spec, cfg, train, device="cpu", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = build_peft_model(spec, cfg, train, device="cpu", seed=3)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in lora_layer.adapter_state(ours).values():
            p.normal_(0, 0.5)  # B = 0 at init would hide a wrong layout
    peft.set_peft_model_state_dict(theirs, {k: v.detach().clone() for k, v in
                                            lora_layer.adapter_state(ours).items()})
    return ours, theirs


def _loss_and_grads(model: Any, ids: Any) -> tuple[Any, dict[str, Any]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
             for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


PATTERNS = {"rank_pattern": "gate_up_proj=8,q_proj=2", "alpha_pattern": "gate_up_proj=32,v_proj=2"}


@pytest.mark.parametrize("precision, knobs", [("fp32", {}), ("bf16", {}), ("fp32", PATTERNS)])
def test_logits_and_gradients_equal_peft(precision: str, knobs: dict[str, str]) -> None:
    train = TrainSpec(precision=precision)
    ours, theirs = _pair(train, _cfg(**knobs))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    (la, ga), (lb, gb) = _loss_and_grads(ours, ids), _loss_and_grads(theirs, ids)
    assert sorted(ga) == sorted(gb) and len(ga) == 2 * (2 + 3) * 2  # 2 layers x (q, v, gate, gate_up, down) x (A, B)
    assert torch.equal(la, lb)
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name


def test_trainable_count_matches_peft_and_planner() -> None:
    train = TrainSpec(precision="bf16")
    spec = load_model("mixtral-8x7b")
    for targets, knobs in (("experts", {}), ("mlp.experts.down_proj", {}), (ALL_RAW, PATTERNS)):
        cfg = _cfg(targets, target_modules="q_proj,k_proj,v_proj,o_proj", **knobs)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = build_peft_model(spec, cfg, train, device="meta")
            ours = prepare_model(spec, cfg, train, device="meta")
        count = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, theirs)]
        assert count[0] == count[1] == predict(spec, cfg, train).trainable_params, targets


def test_saved_adapter_loads_in_peft(tmp_path: Any) -> None:
    train = TrainSpec(precision="fp32")
    spec, cfg = load_model("tiny-mixtral"), _cfg(**PATTERNS)
    ours, _ = _pair(train, cfg)
    lora_layer.save_adapter(ours, tmp_path, spec, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build_model(spec, train, device="cpu", seed=3), tmp_path)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    ours.eval()
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5)


def test_merge_folds_the_update_into_the_experts() -> None:
    train = TrainSpec(precision="fp32")
    ours, _ = _pair(train, _cfg())
    ours.eval()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = ours(input_ids=ids).logits
        lora_layer.merge(ours)
        merged = ours(input_ids=ids).logits
        lora_layer.unmerge(ours)
        after = ours(input_ids=ids).logits
    assert torch.allclose(before, merged, atol=1e-4) and torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("stack", ["lorabench", "peft"])
@pytest.mark.parametrize("model, checkpointing", [("tiny-mixtral", False), ("mixtral-8x7b", True)])
def test_planner_matches_trace(stack: str, model: str, checkpointing: bool) -> None:
    spec, cfg = load_model(model), make_config("lora", {"target_parameters": "experts"})
    train = TrainSpec(precision="bf16", gradient_checkpointing=checkpointing)
    traced = trace(spec, cfg, train, stack=stack).peak_bytes
    planned = predict(spec, cfg, train).peak_allocated_bytes
    assert abs(planned - traced) / traced < (0.01 if model == "tiny-mixtral" else 0.001)


@pytest.mark.parametrize("knobs, words", [
    ({"rank_pattern": "o_proj"}, "rank_pattern entry 'o_proj' is not name=number"),
    ({"rank_pattern": "o_proj=1.5"}, "not a positive integer"),
    ({"alpha_pattern": "o_proj=-1"}, "must be positive"),
    ({"target_parameters": "experts", "lora_dropout": 0.1}, "lora_dropout must be 0"),
    ({"target_parameters": "experts", "use_dora": True}, "DoRA does not apply"),
])
def test_peft_refusals(knobs: dict[str, Any], words: str) -> None:
    with pytest.raises(UserError, match=words):
        make_config("lora", knobs)


def test_unknown_parameter_is_one_line() -> None:
    with pytest.raises(UserError, match="match no raw parameter of tiny-mixtral") as err:
        predict(load_model("tiny-mixtral"), _cfg("mlp.experts.up_proj"), TrainSpec(precision="bf16"))
    assert "choose among: experts, mlp.gate.weight" in err.value.fix


def test_peft_stack_all_linear_adapts_the_experts_as_peft_does(capsys: Any) -> None:
    """On the PEFT stack, all-linear on Mixtral means PEFT's conversion: router and experts too (gate_up_proj
    at 2r): the planner's count equals PEFT's own, and its peak the trace of PEFT's model within 0.1%."""
    from lorabench.cli import main
    from lorabench.recipes import stack_method

    spec = load_model("mixtral-8x7b")
    train = TrainSpec(precision="bf16", gradient_checkpointing=True, stack="peft")
    cfg = stack_method(spec, make_config("lora", {"r": 4, "target_modules": "all-linear"}), train)
    assert cfg.target_parameters == ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = build_model(spec, train, device="meta")
        theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=4, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))
    planned = predict(spec, cfg, train)
    assert planned.trainable_params == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    traced = trace(spec, cfg, train, stack="peft").peak_bytes
    assert abs(planned.peak_allocated_bytes - traced) / traced < 0.001
    lorabench_stack = TrainSpec(precision="bf16", gradient_checkpointing=True)
    assert stack_method(spec, make_config("lora", {"target_modules": "all-linear"}), lorabench_stack).target_parameters is None
    assert main(["plan", "--model", "mixtral", "--recipe", "qlora-paper"]) == 2
    assert "refuses lora_dropout != 0" in capsys.readouterr().err


def _fold_and_routed(precision: str) -> tuple[Any, Any]:
    spec, train = load_model("tiny-mixtral"), TrainSpec(precision=precision)
    models = []
    for path in ("fold", "routed"):
        model = prepare_model(spec, _cfg("experts", experts_path=path), train, device="cpu", seed=3)
        torch.manual_seed(5)
        with torch.no_grad():
            for p in lora_layer.adapter_state(model).values():
                p.normal_(0, 0.5)
        models.append(model)
    return models[0], models[1]


@pytest.mark.parametrize("precision, atol, rtol", [("fp32", 1e-5, 1e-4), ("bf16", 3e-2, 6e-2)])
def test_routed_path_computes_what_the_fold_computes(precision: str, atol: float, rtol: float) -> None:
    """x (W + s B A)^T = x W^T + s (x A^T) B^T: the same logits and adapter gradients (bf16: the fold rounds
    W + s B A to bf16, the routed path rounds the two products)."""
    fold, routed = _fold_and_routed(precision)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    (la, ga), (lb, gb) = _loss_and_grads(fold, ids), _loss_and_grads(routed, ids)
    assert torch.allclose(la, lb, atol=atol)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=rtol * float(ga[name].abs().max()) + 1e-12), name


def test_routed_adapters_load_in_peft(tmp_path: Any) -> None:
    spec, cfg = load_model("tiny-mixtral"), _cfg("experts", experts_path="routed")
    _, routed = _fold_and_routed("fp32")
    lora_layer.save_adapter(routed, tmp_path, spec, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build_model(spec, TrainSpec(precision="fp32"), device="cpu", seed=3),
                                                tmp_path)
    routed.eval()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(routed(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("model, batch, seq, ckpt, tolerance", [
    ("tiny-mixtral", 1, 512, False, 0.02),
    ("mixtral-8x7b", 1, 512, True, 0.001),
    ("mixtral-8x7b", 4, 2048, True, 0.01),
])
def test_routed_planner_matches_trace(model: str, batch: int, seq: int, ckpt: bool, tolerance: float) -> None:
    spec, cfg = load_model(model), make_config("lora", {"target_parameters": "experts", "experts_path": "routed"})
    train = TrainSpec(micro_batch_size=batch, seq_len=seq, precision="bf16", gradient_checkpointing=ckpt)
    traced = trace(spec, cfg, train).peak_bytes
    assert abs(predict(spec, cfg, train).peak_allocated_bytes - traced) / traced < tolerance


def test_routed_path_saves_the_folds_memory_and_peft_refuses_it() -> None:
    from lorabench.recipes import stack_method

    spec, train = load_model("mixtral-8x7b"), TrainSpec(precision="bf16")
    fold, routed = (predict(spec, _cfg("experts", experts_path=p), train) for p in ("fold", "routed"))
    per_layer = 8 * 3 * 14336 * 4096 * 2  # the folded copies of gate_up and down, bf16
    assert fold.components["activations"] - routed.components["activations"] > 0.95 * 32 * per_layer
    with pytest.raises(UserError, match="experts_path=routed is lorabench's own"):
        stack_method(spec, _cfg("experts", experts_path="routed"), TrainSpec(precision="bf16", stack="peft"))
    with pytest.raises(UserError, match="experts_path 'fused' is unknown"):
        _cfg("experts", experts_path="fused")


def test_peft_folds_twice_per_forward_and_the_routed_path_moves_nothing_weight_sized() -> None:
    """PEFT's checked register_parametrization evaluates the fold once more (peft 0.21.2); the routed path's
    forward bytes are the routed rows and the factors only (b=1, s=512: a few % of the fold's)."""
    from lorabench.methods.lora.steptime import fold_work

    spec = load_model("mixtral-8x7b")
    ours, peft_fold = (fold_work(spec, _cfg("experts"), TrainSpec(precision="bf16", stack=s))[0]
                       for s in ("lorabench", "peft"))
    assert peft_fold.flops == pytest.approx(2 * ours.flops) and peft_fold.bytes == pytest.approx(2 * ours.bytes)
    routed = fold_work(spec, _cfg("experts", experts_path="routed"), TrainSpec(precision="bf16"))[0]
    weight_bytes = spec.num_layers * sum(m.copies * m.in_features * m.out_features * 2
                                         for m in spec.matrices if m.copies > 1)
    assert ours.bytes > 2 * weight_bytes > 20 * routed.bytes  # the fold reads W and writes W'; routed: rows only


def test_tracing_fp32_experts_is_one_line(capsys: Any) -> None:
    """prepare_model_for_kbit_training casts Mixtral's 16-bit experts to fp32 (hf-qlora): the plan counts it
    (84.5 -> 169 GiB of weights), the tracer cannot run torch's bf16-only grouped matmul on them."""
    from lorabench.cli import main

    assert main(["plan", "--model", "mixtral", "--recipe", "hf-qlora", "--format", "json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["prediction"]["components"]["weights"] > 160 * 2**30
    assert main(["trace", "--model", "mixtral", "--recipe", "hf-qlora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes bf16 only (these weights are fp32, cast by prepare_kbit)" in err[0]
