"""The paths this CPU machine cannot run, checked where CUDA exists (skipped without it): the PEFT stack's
4-bit load on the GPU, and LoRA's routed expert path on the GPU's grouped matmul against the fold."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lorabench.catalog import load_model  # noqa: E402
from lorabench.memory.planner import predict  # noqa: E402
from lorabench.methods import make_config  # noqa: E402
from lorabench.specs import TrainSpec  # noqa: E402

pytestmark = pytest.mark.gpu


def test_peft_stack_qlora_loads_in_4bit_on_cuda_and_trains() -> None:
    from lorabench.quant.bnb_backend import import_bitsandbytes
    from lorabench.runtime.stacks import build_for_stack

    bnb = import_bitsandbytes()
    spec, cfg = load_model("tiny-llama"), make_config("qlora")
    train = TrainSpec(precision="bf16", stack="peft", gradient_checkpointing=True, prepare_kbit=True)
    model = build_for_stack(spec, cfg, train, device="cuda", seed=0)
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert layer.weight.device.type == "cuda" and layer.weight.bnb_quantized
    ids = torch.randint(0, spec.vocab_size, (2, 64), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == predict(spec, cfg, train).trainable_params


def test_routed_expert_path_matches_the_fold_on_cuda() -> None:
    from lorabench.methods.lora import layer as lora_layer
    from lorabench.runtime.build import prepare_model

    spec, train = load_model("tiny-mixtral"), TrainSpec(precision="fp32")
    outs = []
    for path in ("fold", "routed"):
        model = prepare_model(spec, make_config("lora", {"r": 8, "target_parameters": "experts", "experts_path": path}),
                              train, device="cuda", seed=3)
        torch.manual_seed(5)
        with torch.no_grad():
            for p in lora_layer.adapter_state(model).values():
                p.normal_(0, 0.5)
        ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (la, ga), (lb, gb) = outs
    assert torch.allclose(la, lb, atol=1e-4)
    assert all(torch.allclose(ga[n], gb[n], atol=1e-4 * float(ga[n].abs().max())) for n in ga)
