"""Torch helpers the method runtimes share: dtypes, freezing, module surgery, the decoder layers, PEFT's
adapter file format. Imports nothing from :mod:`lorabench.runtime` (the runtime imports the methods)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lorabench.errors import UserError
from lorabench.methods.base import MethodConfig
from lorabench.specs import TrainSpec

TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""lorabench dtype names -> torch dtypes."""


def torch_dtype(name: str) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` -> the torch dtype.

    Raises:
        UserError: an unknown dtype name.
    """
    if name not in TORCH_DTYPES:
        raise UserError(f"unknown dtype {name!r}", f"use one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def adapter_torch_dtype(cfg: MethodConfig, train: TrainSpec) -> torch.dtype:
    """dtype of a PEFT-style method's trainable weights.

    ``cfg.adapter_dtype`` is ``fp32`` (default, PEFT's ``autocast_adapter_dtype=True``), ``bf16``/``fp16``
    (forced), or ``base`` (the model's parameter dtype, PEFT's ``autocast_adapter_dtype=False``).
    """
    name = cfg.adapter_dtype
    if name == "base":
        return torch_dtype(train.param_dtype)
    if name not in TORCH_DTYPES:
        raise UserError(f"adapter_dtype {name!r} is unknown", "use fp32, bf16, fp16 or base")
    return TORCH_DTYPES[name]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: ``model.model.layers`` (Llama family) or ``model.transformer.h`` (GPT-2)."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers
    transformer = getattr(model, "transformer", None)
    if transformer is not None and isinstance(getattr(transformer, "h", None), nn.ModuleList):
        return transformer.h
    raise UserError(f"cannot find the decoder layers of {type(model).__name__}",
                    "lorabench supports Llama-family models and GPT-2")


def layer_module_paths(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(dotted path from the causal LM, layer module) for every decoder layer, e.g. ``model.layers.3``."""
    layers = decoder_layers(model)
    prefix = next(name for name, mod in model.named_modules() if mod is layers)
    for i, layer in enumerate(layers):
        yield f"{prefix}.{i}", layer


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (relative to ``root``) by ``new``."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


def freeze(model: nn.Module) -> None:
    """``requires_grad_(False)`` on every parameter (methods then unfreeze what they train)."""
    for param in model.parameters():
        param.requires_grad_(False)


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (4-bit layers hold their weight in buffers)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: ``y = x @ W + b`` with ``W`` stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_4bit(module: nn.Module) -> bool:
    """lorabench's ``Linear4bit`` or bitsandbytes' ``bnb.nn.Linear4bit``."""
    return type(module).__name__ == "Linear4bit"


def dequantize_module_weight(module: nn.Module) -> torch.Tensor:
    """PEFT's ``dequantize_module_weight``: a dense layer's weight parameter itself; a 4-bit layer's weight
    dequantized to the dtype it was quantized from (bitsandbytes' ``quant_state.dtype``)."""
    if not is_4bit(module):
        return module.weight
    weight = module.weight
    if hasattr(module, "dequantize"):  # lorabench's Linear4bit (an NF4Tensor knows its original dtype)
        return module.dequantize(weight.dtype)
    from lorabench.quant.bnb_backend import import_bitsandbytes

    return import_bitsandbytes().functional.dequantize_4bit(weight.data, weight.quant_state)


class UninitLinear(nn.Linear):
    """An ``nn.Linear`` without torch's default init: its owner initialises it (and on meta nothing needs
    initialising, which keeps counting/tracing a 405B model fast)."""

    def reset_parameters(self) -> None:
        pass


# ---------------------------------------------------------------- PEFT's adapter file format

PEFT_KEY_PREFIX = "base_model.model."
"""What PEFT puts in front of the causal LM's own parameter names in adapter files."""
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def save_peft_files(directory: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (keys already PEFT-named)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def load_peft_state(directory: str | Path, params: dict[str, nn.Parameter]) -> None:
    """Copy the tensors of a PEFT adapter file into ``params`` (the model's adapter parameters, by name).

    Raises:
        UserError: a missing file, keys that do not match ``params`` one to one, or a shape mismatch.
    """
    from safetensors.torch import load_file

    file = Path(directory) / WEIGHTS_FILE
    if not file.is_file():
        raise UserError(f"no {WEIGHTS_FILE} in {directory}", "pass a folder written by save_adapter or PEFT")
    loaded = {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in load_file(str(file)).items()}
    missing, unexpected = sorted(set(params) - set(loaded)), sorted(set(loaded) - set(params))
    if missing or unexpected:
        raise UserError(f"adapter in {directory} does not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})", "prepare the model with the same method and targets")
    with torch.no_grad():
        for key, param in params.items():
            if tuple(loaded[key].shape) != tuple(param.shape):
                raise UserError(f"{key}: shape {tuple(loaded[key].shape)} != {tuple(param.shape)}",
                                "prepare the model with the same rank/targets as the saved adapter")
            param.copy_(loaded[key].to(param.dtype))


def materialize_direct(module: nn.Module, device: torch.device | str, memo: dict[int, torch.Tensor]) -> bool:
    """Replace ``module``'s own meta parameters/buffers by empty tensors on ``device`` (tied ones once, via
    ``memo``); True when anything was replaced."""
    changed = False
    for name, param in list(module.named_parameters(recurse=False)):
        if param.device.type == "meta":
            if id(param) not in memo:
                memo[id(param)] = nn.Parameter(torch.empty_like(param, device=device),
                                               requires_grad=param.requires_grad)
            setattr(module, name, memo[id(param)])
            changed = True
    for name, buf in list(module.named_buffers(recurse=False)):
        if buf is not None and buf.device.type == "meta":
            module._buffers[name] = torch.empty_like(buf, device=device)
            changed = True
    return changed


def init_on_device(model: nn.Module, device: torch.device | str, memo: dict[int, torch.Tensor] | None = None,
                   skip: Any = None) -> nn.Module:
    """Materialize every module still on meta directly on ``device`` and initialise it there with transformers'
    own ``_init_weights`` (the init ``from_config`` runs), module by module; ``skip(module)`` leaves a module
    alone (already built). Nothing is allocated or initialised on the CPU for a CUDA model."""
    memo = {} if memo is None else memo
    for module in model.modules():
        if (skip is None or not skip(module)) and materialize_direct(module, device, memo):
            with torch.no_grad():
                model._init_weights(module)
    return model
