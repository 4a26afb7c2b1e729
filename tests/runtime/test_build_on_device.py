"""Models built for an accelerator straight from meta (build_on_device): the same model as the classic build."""

from __future__ import annotations

import pytest
import torch

from lorabench.catalog import load_model
from lorabench.runtime.build import build_model, build_on_device
from lorabench.specs import TrainSpec

TINY = ("tiny-llama", "tiny-gpt2", "tiny-qwen2", "tiny-mistral", "tiny-phi3", "tiny-mixtral", "tiny-gemma2")


@pytest.mark.parametrize("name", TINY)
def test_meta_then_device_init_gives_the_classic_model(name: str) -> None:
    """Run on the CPU here (the code path a GPU takes): same parameters and buffers, tying kept, norms at
    their init, weights at transformers' init scale, nothing left uninitialised."""
    spec = load_model(name)
    train = TrainSpec(precision="fp32", attention="sdpa" if spec.traits.supports_sdpa else "eager")
    classic = build_model(spec, train, device="cpu", seed=0)
    direct = build_on_device(spec, train, device="cpu", seed=0)
    ref_params, params = dict(classic.named_parameters()), dict(direct.named_parameters())
    assert {n: (p.shape, p.dtype) for n, p in params.items()} == {n: (p.shape, p.dtype) for n, p in ref_params.items()}
    for n, b in classic.named_buffers():
        assert torch.equal(dict(direct.named_buffers())[n], b), n  # e.g. RoPE inv_freq recomputed on the device
    if spec.tie_word_embeddings:
        assert direct.get_output_embeddings().weight is direct.get_input_embeddings().weight
    std = float(spec.hf_config.get("initializer_range", 0.02))
    for n, p in params.items():
        assert torch.isfinite(p).all(), n
        if p.dim() == 1:  # norms and biases: their exact init
            assert torch.equal(p, ref_params[n]), n
        elif p.numel() >= 1024:
            assert p.std().item() == pytest.approx(ref_params[n].std().item(), rel=0.25), n
    assert direct.get_input_embeddings().weight.std().item() == pytest.approx(std, rel=0.25)
