"""LoRA on fused experts without the fold (``experts_path="routed"``): lorabench's own expert path.

PEFT's ParamWrapper (:mod:`lorabench.methods.lora.experts`, ``experts_path="fold"``) materializes
``W' = W + scaling * B_e A_e`` for every expert in every forward: a copy of the whole expert tensor that the
matmul saves for backward (2.6 GiB a layer on Mixtral-8x7B) and whose gradient backward makes. Since

    x_e (W_e + s B_e A_e)^T = x_e W_e^T + s (x_e A_e^T) B_e^T

the routed path runs the tokens routed to expert e through its frozen W_e and, beside it, through A_e
(r wide) and B_e, as grouped matmuls over the same sorted tokens: nothing weight-sized is made, saved or
differentiated, and the frozen experts need no weight-gradient matmul. The factors are cast to the
activations' dtype, as the fold casts them to W's. Routing, gating and the weighted sum over the k experts
follow transformers' ``grouped_mm`` experts implementation (docs/SOURCES.md#transformers-grouped-mm: sort the
token-expert pairs by expert, group offsets from a histogram, gate, down, weight, restore the order, sum),
with its grouped-matmul dispatcher, which has a CPU fallback. The parameter layout and file keys are
ParamLora's (PEFT's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorabench.errors import UserError


def _grouped(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(S, in) x grouped (E, out, in) -> (S, out): rows of group e (by ``offsets``) times W_e^T.

    torch's grouped matmul wants every operand stride a multiple of 16 bytes; an r-wide factor of r * itemsize
    bytes that is not (r = 4 in bf16) takes transformers' per-group fallback instead."""
    from transformers.integrations.moe import _grouped_mm

    w = weight.transpose(-2, -1)
    if any((d * x.element_size()) % 16 for d in (x.size(-1), w.size(-1))):
        return torch.ops.transformers.grouped_mm_fallback(x.to(w.dtype), w, offs=offsets)
    return _grouped_mm(x, w, offs=offsets)


def _lora(x: torch.Tensor, wrapper: Any, offsets: torch.Tensor) -> torch.Tensor:
    """scaling * (x_e A_e^T) B_e^T per group, factors cast to x's dtype."""
    e, r = wrapper.num_experts, wrapper.r
    a = wrapper.lora_A.weight.reshape(e, r, wrapper.in_features).to(x.dtype)
    b = wrapper.lora_B.weight.reshape(wrapper.out_features, r, e).permute(2, 0, 1).to(x.dtype).contiguous()
    return _grouped(_grouped(x, a, offsets), b, offsets) * wrapper.scaling


def check_routable(experts: nn.Module) -> None:
    """Refuse an experts module the routed path does not cover (it needs Mixtral's layout).

    Raises:
        UserError: transposed, biased, ungated or interleaved experts.
    """
    layout = {k: getattr(experts, k, None) for k in ("is_transposed", "has_bias", "has_gate", "is_concatenated")}
    if layout != {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True}:
        raise UserError(f"experts_path=routed covers Mixtral-style experts (gate_up, down, no bias), not {layout}",
                        "use experts_path=fold (PEFT's ParamWrapper)")


def routed_experts_forward(experts: nn.Module, wrappers: dict[str, Any], hidden_states: torch.Tensor,
                           top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' output with LoRA on the parameters in ``wrappers`` (name -> ParamLora) added per group."""
    k, tokens, hidden = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states[perm // k]
    weights = top_k_weights.reshape(-1)[perm]
    counts = torch.histc(expert_ids.float() if x.device.type in ("cpu", "mps") else expert_ids.int(),
                         bins=experts.num_experts, min=0, max=experts.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gate_up = _grouped(x, experts.gate_up_proj, offsets)
    if "gate_up_proj" in wrappers:
        gate_up = gate_up + _lora(x, wrappers["gate_up_proj"], offsets).to(gate_up.dtype)
    h = experts._apply_gate(gate_up)
    down = _grouped(h, experts.down_proj, offsets)
    if "down_proj" in wrappers:
        down = down + _lora(h, wrappers["down_proj"], offsets).to(down.dtype)
    weighted = down * weights.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    return weighted[inverse].view(tokens, k, hidden).sum(dim=1).to(hidden_states.dtype)
