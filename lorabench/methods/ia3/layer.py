"""IA3 runtime (Liu et al. 2022, arXiv:2205.05638, Sec. 3.3): learned vectors rescale activations.

PEFT semantics (peft 0.21 ``ia3.Linear``): a non-feed-forward target scales its OUTPUT by ``l`` of shape
(out_features, 1); a feed-forward target scales its INPUT by ``l`` of shape (1, in_features). ``l`` starts at
ones (identity) and is kept in the adapter dtype (fp32 by default, PEFT's autocast_adapter_dtype=True)::

    feed-forward:      y = base((x.to(l.dtype) * l).to(x.dtype))
    otherwise:         y = (base(x) * l).to(base(x).dtype)

Files: ``save_adapter``/``load_adapter`` use PEFT's format (``...k_proj.ia3_l`` keys, ``peft_type: IA3``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorabench.errors import UserError
from lorabench.methods.ia3.config import IA3Config
from lorabench.methods.common import (PEFT_KEY_PREFIX, adapter_torch_dtype, freeze, is_conv1d, layer_module_paths,
                                      load_peft_state, module_device, replace_module, save_peft_files)
from lorabench.methods.targets import name_matches, select
from lorabench.specs import MatrixSpec, ModelSpec, TrainSpec


class IA3Linear(nn.Module):
    """A frozen projection whose input (feed-forward) or output (otherwise) is scaled by a learned vector.

    Args:
        base_layer: ``nn.Linear`` or GPT-2 ``Conv1D``.
        in_features, out_features: the projection's shape.
        is_feedforward: scale the input (in_features) rather than the output (out_features).
        dtype: dtype of ``ia3_l``.
    """

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, *, is_feedforward: bool,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.is_feedforward = is_feedforward
        shape = (1, in_features) if is_feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype, device=module_device(base_layer)))
        self.fan_in_fan_out = is_conv1d(base_layer)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            scaled = (x.to(scale.dtype) * scale).to(x.dtype)
            return self.base_layer(scaled, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)

    def extra_repr(self) -> str:
        return f"is_feedforward={self.is_feedforward}"


def feedforward_targets(spec: ModelSpec, cfg: IA3Config) -> tuple[str, ...]:
    """``cfg.feedforward_modules``, or PEFT's per-architecture default (empty when there is none)."""
    if cfg.feedforward_modules is None:
        return spec.traits.ia3_default_feedforward
    if cfg.feedforward_modules == "all-linear":
        raise UserError("ia3 feedforward_modules cannot be 'all-linear'", "list the feed-forward modules")
    return tuple(cfg.feedforward_modules)


def ia3_targets(spec: ModelSpec, cfg: IA3Config) -> list[tuple[MatrixSpec, bool]]:
    """(matrix, is_feedforward) for every IA3 target of one decoder layer (PEFT's suffix matching)."""
    chosen = select(spec, cfg.target_modules, spec.traits.ia3_default_targets, cfg.name)
    ff = feedforward_targets(spec, cfg)
    return [(m, any(name_matches(m.name, t) for t in ff)) for m in chosen]


def apply(model: nn.Module, spec: ModelSpec, cfg: IA3Config, train: TrainSpec) -> nn.Module:
    """Freeze the model and wrap every IA3 target in :class:`IA3Linear`.

    Returns:
        ``model`` itself: base parameters frozen in ``train.param_dtype``; ``ia3_l`` vectors trainable in
        ``adapter_torch_dtype(cfg, train)`` (fp32 by default).
    """
    targets = ia3_targets(spec, cfg)
    freeze(model)
    dtype = adapter_torch_dtype(cfg, train)
    for layer_path, _ in layer_module_paths(model):
        for matrix, is_ff in targets:
            path = f"{layer_path}.{matrix.name}"
            wrapped = IA3Linear(model.get_submodule(path), matrix.in_features, matrix.out_features,
                                is_feedforward=is_ff, dtype=dtype)
            replace_module(model, path, wrapped)
    return model


def adapter_state(model: nn.Module) -> dict[str, nn.Parameter]:
    """IA3 vectors by their name in the causal LM (``model.layers.0.self_attn.k_proj.ia3_l``)."""
    return {f"{name}.ia3_l": m.ia3_l for name, m in model.named_modules() if isinstance(m, IA3Linear)}


def save_adapter(model: nn.Module, directory: str | Path, spec: ModelSpec, cfg: IA3Config) -> Path:
    """Save the IA3 vectors in PEFT's format (loadable by ``peft.PeftModel.from_pretrained``)."""
    state = {PEFT_KEY_PREFIX + name: p for name, p in adapter_state(model).items()}
    if not state:
        raise UserError("the model has no IA3 layers to save", "prepare it with method ia3")
    targets = ia3_targets(spec, cfg)
    config = {
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": spec.name,
        "target_modules": sorted(m.name for m, _ in targets),
        "feedforward_modules": sorted(m.name for m, ff in targets if ff),
        "fan_in_fan_out": spec.traits.conv1d, "init_ia3_weights": True, "inference_mode": True,
        "modules_to_save": None,
    }
    return save_peft_files(directory, config, state)


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load IA3 vectors saved by :func:`save_adapter` (or PEFT) into a model prepared with IA3."""
    load_peft_state(directory, adapter_state(model))
    return model
