"""LoRA on fused MoE parameters as PEFT does it (``target_parameters``), counted without torch.

transformers >= 5 stores Mixtral's experts as two 3-D parameters per layer (``mlp.experts.gate_up_proj``
of E x 2I x h, ``mlp.experts.down_proj`` of E x h x I) and its router as a raw ``mlp.gate.weight`` (E x h),
so none of them is an ``nn.Linear`` that ``target_modules`` can match. PEFT wraps such parameters with
``ParamWrapper`` (docs/SOURCES.md#peft-target-parameters): for a 3-D parameter of E experts, lora_A is
in x (r E) and lora_B is (r E) x out, i.e. E r (in + out) parameters; for a 2-D one r (in + out).
On transformers 5, peft 0.21 also rewrites transformers-4 target names (``all-linear``, ``w1``/``w2``/``w3``,
``gate``) to these parameters, at rank 2r (and alpha 2 alpha) for ``gate_up_proj`` because it fuses w1 and w3
(docs/SOURCES.md#peft-moe-conversion).
"""

from __future__ import annotations

from typing import Sequence

from lorabench.errors import UserError
from lorabench.methods.targets import name_matches
from lorabench.specs import MatrixSpec, ModelSpec

EXPERTS = "experts"
"""``target_parameters`` shorthand for every fused expert tensor of the model (copies > 1)."""


def fused_matrices(model: ModelSpec) -> tuple[MatrixSpec, ...]:
    """Layer matrices that are raw parameters, not ``nn.Linear`` modules (routers, fused experts)."""
    return tuple(m for m in model.matrices if not m.is_linear)


def param_wrapper_params(matrix: MatrixSpec, r: int) -> int:
    """Trainable elements of PEFT's ParamWrapper at rank r: copies * r * (in + out)."""
    return matrix.copies * r * (matrix.in_features + matrix.out_features)


def peft_all_linear_extra_params(model: ModelSpec, r: int) -> int:
    """LoRA elements PEFT's ``all-linear`` adds on the router and experts, beyond the nn.Linear targets."""
    ranks = dict(model.traits.peft_all_linear_parameters)
    per_layer = sum(param_wrapper_params(m, r * ranks[m.name]) for m in fused_matrices(model) if m.name in ranks)
    return model.num_layers * per_layer


def select_parameters(model: ModelSpec, targets: str | Sequence[str] | None, method: str) -> tuple[MatrixSpec, ...]:
    """The raw parameters of one decoder layer that ``target_parameters`` adapts: PEFT's suffix rule on the
    parameter path (:attr:`MatrixSpec.parameter_path`), ``experts`` for every fused expert tensor; () for None.

    Raises:
        UserError: the names match no raw parameter of the model.
    """
    if not targets:
        return ()
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    raw = fused_matrices(model)
    if not raw:
        raise UserError(f"{method} target_parameters {list(names)}: {model.name} has no raw parameters (every "
                        f"weight is an nn.Linear module)", "drop --target-parameters; use --target-modules")
    chosen = tuple(m for m in raw if any(name_matches(m.parameter_path, t) or (t == EXPERTS and m.copies > 1)
                                         for t in names))
    if not chosen:
        offer = ", ".join([EXPERTS] + [m.parameter_path for m in raw])
        raise UserError(f"{method} target_parameters {list(names)} match no raw parameter of {model.name}",
                        f"choose among: {offer}; nn.Linear modules go in --target-modules")
    return chosen

