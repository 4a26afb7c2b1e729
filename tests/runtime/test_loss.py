"""lorabench.runtime.loss: the chunked loss equals transformers' ForCausalLMLoss (loss and gradients)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from lorabench.memory.loss import chunk_tokens
from lorabench.runtime.loss import chunked_cross_entropy


def _reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """transformers' path: logits in the compute dtype, soft-capped, upcast, shifted labels, mean CE."""
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    shifted = F.pad(labels[..., 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.float().reshape(-1, weight.shape[0]), shifted.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_loss_and_gradients_match_the_full_logits_path(dtype: torch.dtype, tol: float, softcap: float | None,
                                                       weight_grad: bool) -> None:
    torch.manual_seed(0)
    b, s, h, vocab = 2, 9, 16, 50
    hidden = torch.randn(b, s, h).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, h) * 0.3).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, vocab, (b, s))
    labels[0, 3] = -100  # an ignored label
    hidden_ref = hidden.detach().clone().requires_grad_(True)
    weight_ref = weight.detach().clone().requires_grad_(weight_grad)
    ref = _reference(hidden_ref, weight_ref, labels, softcap)
    got = chunked_cross_entropy(hidden, weight, labels, softcap=softcap, chunk=4)  # 18 tokens: 5 chunks
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=tol, atol=tol)
    (2.0 * got).backward()
    (2.0 * ref).backward()
    assert torch.allclose(hidden.grad.float(), hidden_ref.grad.float(), rtol=tol, atol=tol * 0.1)
    if weight_grad:
        assert torch.allclose(weight.grad.float(), weight_ref.grad.float(), rtol=tol, atol=tol * 0.1)


def test_chunk_size_follows_the_fp32_logits_budget() -> None:
    assert chunk_tokens(4096, 128256) == 523
    assert chunk_tokens(100, 128256) == 100 and chunk_tokens(10, 10**9) == 1


def test_installed_in_a_causal_lm_it_gives_the_models_own_loss_and_gradients() -> None:
    from lorabench.catalog import load_model
    from lorabench.methods import make_config
    from lorabench.runtime.build import prepare_model
    from lorabench.runtime.loss import install_chunked_loss
    from lorabench.specs import TrainSpec

    spec = load_model("tiny-llama")
    model = prepare_model(spec, make_config("lora"), TrainSpec(precision="fp32"), device="cpu", seed=0)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)  # B = 0 at init would make most adapter gradients zero
    ids = torch.randint(0, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        with install_chunked_loss(model) if chunked else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_hf, grads_hf), (loss_ch, grads_ch) = results
    assert torch.allclose(loss_hf, loss_ch, rtol=1e-5)
    for name, grad in grads_hf.items():
        assert torch.allclose(grad, grads_ch[name], rtol=1e-4, atol=1e-7), name
    assert model.lm_head(torch.ones(1, spec.hidden_size)).shape[-1] == spec.vocab_size  # restored
