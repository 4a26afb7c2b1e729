"""LoRA runtime: :class:`LoraLinear`, ``apply``, merge/unmerge, and save/load in PEFT's file format.

LoRA (Hu et al. 2021, arXiv:2106.09685, eq. 3): ``h = W0 x + (alpha/r) * B A x`` with ``A`` (r x in,
kaiming-uniform a=sqrt(5)) and ``B`` (out x r, zeros), so the model is unchanged at init. rsLoRA
(Kalajdzievski 2023, arXiv:2312.03732) scales by ``alpha/sqrt(r)``.

The forward is PEFT's ``lora.Linear.forward`` (peft 0.21, vanilla LoRA) step by step, because the planner's
activation formula counts exactly these tensors::

    result = base_layer(x)                 # frozen W0 (nn.Linear, GPT-2 Conv1D or a 4-bit layer)
    x = x.to(lora_A.weight.dtype)          # a NEW fp32 copy of x when the model is 16-bit (saved by lora_A)
    result = result + lora_B(lora_A(dropout(x))) * scaling
    result = result.to(base result dtype)

Dropout p=0 is ``nn.Identity`` (no copy); p>0 keeps the dropped-out input for lora_A's backward.

Files: ``save_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), loadable by
``peft.PeftModel.from_pretrained``; ``load_adapter`` reads them back into a model prepared with LoRA/QLoRA.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorabench.errors import UserError
from lorabench.methods.lora.config import LoraConfig
from lorabench.methods.targets import select
from lorabench.methods.common import (PEFT_KEY_PREFIX, UninitLinear, adapter_torch_dtype, freeze, is_conv1d,  # noqa: F401
                                      layer_module_paths, load_peft_state, module_device, replace_module,
                                      save_peft_files)
from lorabench.methods.lora.dora import dora_delta, init_magnitude
from lorabench.methods.lora.experts import raw_lora_modules, wrap_raw
from lorabench.methods.lora.experts_memory import raw_targets
from lorabench.specs import MatrixSpec, ModelSpec, TrainSpec


class LoraLinear(nn.Module):
    """A frozen base projection plus a trainable low-rank update (PEFT's ``lora.Linear``).

    Args:
        base_layer: ``nn.Linear``, GPT-2 ``Conv1D``, or a 4-bit linear (lorabench or bitsandbytes).
        in_features, out_features: the projection's shape (``x @ W^T``: in -> out).
        r, lora_alpha, lora_dropout, use_rslora: LoRA hyper-parameters (see :class:`LoraConfig`).
        use_dora: DoRA (:mod:`lorabench.methods.lora.dora`): a trainable ``lora_magnitude_vector`` (out_features,
            in ``dtype``) rescales each output row of ``W + s B A`` to it.
        dtype: dtype of ``lora_A``/``lora_B`` (fp32 by default, PEFT's autocast_adapter_dtype=True).
    """

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, *, r: int,
                 lora_alpha: float, lora_dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        device = module_device(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features, self.r = in_features, out_features, int(r)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout: nn.Module = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = UninitLinear(in_features, self.r, bias=False, device=device, dtype=dtype)
        self.lora_B = UninitLinear(self.r, out_features, bias=False, device=device, dtype=dtype)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.merged = False
        self.use_dora = use_dora
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        if device.type != "meta":
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's init_lora_weights=True: A ~ kaiming_uniform(a=sqrt(5)), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(init_magnitude(self))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        lora_dtype = self.lora_A.weight.dtype
        if x.dtype != lora_dtype:
            x = x.to(lora_dtype)
        if not self.use_dora:
            result = result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        elif isinstance(self.lora_dropout, nn.Identity) or not self.training:
            result = result + dora_delta(self, x, result)
        else:  # PEFT: with dropout the base output is recomputed from the dropped-out input
            result = result + dora_delta(self, self.lora_dropout(x), None)
        return result.to(result_dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` as an (out, in) tensor in the adapter dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _dense_weight(self) -> torch.Tensor:
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise UserError("cannot merge LoRA into a quantized base layer in place",
                            "use lorabench.methods.qlora.layer.merge_qlora")
        return weight

    def merge(self) -> None:
        """``W0 += scaling * B A`` (transposed for Conv1D); the forward then skips the adapter."""
        if self.merged:
            return
        if self.use_dora:
            raise UserError("merging a DoRA adapter is not supported", "keep it unmerged, or train without use_dora")
        weight = self._dense_weight()
        with torch.no_grad():
            delta = self.delta_weight()
            weight += (delta.T if self.fan_in_fan_out else delta).to(weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the rounding of the base weight dtype)."""
        if not self.merged:
            return
        weight = self._dense_weight()
        with torch.no_grad():
            delta = self.delta_weight()
            weight -= (delta.T if self.fan_in_fan_out else delta).to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, fan_in_fan_out={self.fan_in_fan_out}"


def wrap_lora(model: nn.Module, chosen: tuple[MatrixSpec, ...], cfg: LoraConfig, dtype: torch.dtype) -> None:
    """Replace the ``chosen`` projections of every decoder layer by :class:`LoraLinear` wrappers."""
    for layer_path, _ in layer_module_paths(model):
        for matrix in chosen:
            path = f"{layer_path}.{matrix.name}"
            base = model.get_submodule(path)
            wrapped = LoraLinear(base, matrix.in_features, matrix.out_features, r=cfg.rank_for(matrix.name),
                                 lora_alpha=cfg.alpha_for(matrix.name), lora_dropout=cfg.lora_dropout,
                                 use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, dtype=dtype)
            replace_module(model, path, wrapped)


def wrap_all(model: nn.Module, spec: ModelSpec, cfg: LoraConfig, dtype: torch.dtype) -> None:
    """LoraLinear on the targeted projections, ParamLora on the ``target_parameters`` (fused experts)."""
    wrap_lora(model, select(spec, cfg.target_modules, spec.traits.lora_default_targets, cfg.name), cfg, dtype)
    wrap_raw(model, raw_targets(spec, cfg), cfg, dtype)


def apply(model: nn.Module, spec: ModelSpec, cfg: LoraConfig, train: TrainSpec) -> nn.Module:
    """Freeze the model and wrap the targeted projections (``targets.select`` rules) in LoraLinear and the
    ``target_parameters`` in ParamLora (:mod:`lorabench.methods.lora.experts`).

    Returns:
        ``model`` itself, mutated: base parameters frozen in ``train.param_dtype``; ``lora_A``/``lora_B``
        trainable in ``adapter_torch_dtype(cfg, train)`` (fp32 by default), on the base weight's device.
    """
    freeze(model)
    wrap_all(model, spec, cfg, adapter_torch_dtype(cfg, train))
    return model


def lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    """(path, module) of every LoraLinear."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]


def merge(model: nn.Module) -> None:
    """Merge every LoRA adapter into its (dense) base weight or raw parameter."""
    for _, module in [*lora_modules(model), *raw_lora_modules(model)]:
        module.merge()


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` everywhere."""
    for _, module in [*lora_modules(model), *raw_lora_modules(model)]:
        module.unmerge()


def adapter_state(model: nn.Module) -> dict[str, nn.Parameter]:
    """LoRA parameters by their name in the causal LM (``model.layers.0.self_attn.q_proj.lora_A.weight``)."""
    state: dict[str, nn.Parameter] = {}
    for name, module in lora_modules(model):
        state[f"{name}.lora_A.weight"] = module.lora_A.weight
        state[f"{name}.lora_B.weight"] = module.lora_B.weight
        if module.use_dora:
            state[f"{name}.lora_magnitude_vector"] = module.lora_magnitude_vector
    for name, raw in raw_lora_modules(model):
        state[f"{name}.lora_A.weight"] = raw.lora_A.weight
        state[f"{name}.lora_B.weight"] = raw.lora_B.weight
    return state


def save_adapter(model: nn.Module, directory: str | Path, spec: ModelSpec, cfg: LoraConfig) -> Path:
    """Save the LoRA weights in PEFT's format (also for QLoRA: the same LoRA keys over a 4-bit base)."""
    state = {PEFT_KEY_PREFIX + name: p for name, p in adapter_state(model).items()}
    if not state:
        raise UserError("the model has no LoRA layers to save", "prepare it with method lora or qlora")
    chosen = select(spec, cfg.target_modules, spec.traits.lora_default_targets, cfg.name)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": spec.name,
        "r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        "use_rslora": cfg.use_rslora, "target_modules": sorted(m.name for m in chosen), "bias": "none",
        "fan_in_fan_out": spec.traits.conv1d, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "use_dora": cfg.use_dora,
        "target_parameters": sorted(m.parameter_path for m in raw_targets(spec, cfg)) or None,
        "rank_pattern": cfg.peft_rank_pattern, "alpha_pattern": cfg.peft_alpha_pattern,
    }
    return save_peft_files(directory, config, state)


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load LoRA weights saved by :func:`save_adapter` (or PEFT) into a model prepared with LoRA/QLoRA."""
    load_peft_state(directory, adapter_state(model))
    return model
