"""Build a randomly initialised transformers model from a :class:`ModelSpec` and apply a method to it.

No weights are ever downloaded: the model comes from ``spec.hf_config`` (the same dict the planner reads),
with ``torch.manual_seed(seed)`` random init. ``device="meta"`` builds shapes and dtypes only (a 7B model in
~0.05 s), which is what the tracer and the exact-count tests use.

dtypes (``TrainSpec.param_dtype``): ``fp32``/``bf16-mixed``/``fp16-mixed`` keep every base parameter in
fp32 (the mixed precisions autocast the matmuls); ``bf16``/``fp16`` store the model in 16 bit. Adapter
weights follow ``cfg.adapter_dtype`` (:func:`adapter_torch_dtype`), fp32 by default like PEFT's
``autocast_adapter_dtype=True``.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Iterator

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lorabench.errors import UserError
from lorabench.methods.base import MethodConfig
from lorabench.specs import ModelSpec, TrainSpec

TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""lorabench dtype names -> torch dtypes."""

#: model_types whose transformers implementation refuses ``attn_implementation="sdpa"`` (attention softcapping).
_NO_SDPA = ("gemma2",)


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


def build_model(spec: ModelSpec, train: TrainSpec, *, device: str = "cpu", seed: int = 0) -> PreTrainedModel:
    """The transformers causal LM of ``spec`` with random init, parameters in ``train.param_dtype``.

    Args:
        spec: the model (``spec.hf_config`` is the Hugging Face config dict).
        train: precision (parameter dtype) and attention implementation.
        device: where to allocate: ``"cpu"``, ``"cuda"``, or ``"meta"`` (shapes only, instant).
        seed: ``torch.manual_seed`` before init, so two builds are bit-identical.

    Returns:
        The model with ``config.use_cache = False``; every parameter has ``requires_grad=True``.

    Raises:
        UserError: the architecture cannot run ``train.attention`` (Gemma-2 has no sdpa path).
    """
    if train.attention == "sdpa" and spec.model_type in _NO_SDPA:
        raise UserError(f"transformers has no sdpa attention for {spec.model_type} ({spec.name})",
                        "pass --attention eager")
    config = AutoConfig.for_model(**dict(spec.hf_config))
    config.use_cache = False
    torch.manual_seed(seed)
    on_meta = torch.device(device).type == "meta"
    with torch.device(device), (_no_init_weights() if on_meta else contextlib.nullcontext()):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=train.attention,
                                                 dtype=torch_dtype(train.param_dtype))
    if on_meta:
        model.tie_weights()  # skipped init also skipped the tying
    model.config.use_cache = False
    return model


def _no_init_weights() -> contextlib.AbstractContextManager[Any]:
    """transformers' context that skips weight init (meta tensors have no values to init): 2x faster."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers keep it in modeling_utils
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


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


def prepare_model(spec: ModelSpec, method_cfg: MethodConfig, train: TrainSpec, *, device: str = "cpu",
                  seed: int = 0) -> nn.Module:
    """Build the model, apply the method, then enable gradient checkpointing if asked.

    The method is applied by ``lorabench.methods.<name>.layer.apply(model, spec, cfg, train)``. A method's
    layer module may also define ``build(spec, cfg, train, *, device, seed)`` to build the base model itself
    on real devices (QLoRA does: it quantizes each linear right after its init, so the 16-bit model never
    exists in full; on meta the plain build is used). Prefix tuning
    returns a wrapper module (``PrefixModel``) around the causal LM; every other method returns the causal LM
    itself, mutated. Checkpointing is transformers' own, non-reentrant (``use_reentrant=False``): it needs no
    input-requires-grad hook, so transformers' hook is removed again when the input embedding is frozen
    (otherwise backward would compute a useless gradient for the first layer's input).

    Args:
        spec, method_cfg, train: what to build.
        device: ``"cpu"``, ``"cuda"`` or ``"meta"`` (every method, QLoRA included, works on meta).
        seed: random init seed (base weights, then adapter init).
    """
    layer = importlib.import_module(f"lorabench.methods.{method_cfg.name}.layer")
    builder = getattr(layer, "build", None)
    if builder is not None and device != "meta":
        model = builder(spec, method_cfg, train, device=device, seed=seed)
    else:
        model = build_model(spec, train, device=device, seed=seed)
    model = layer.apply(model, spec, method_cfg, train)
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def hf_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model`` (itself, or the ``.model`` of a wrapper such as PrefixModel)."""
    if isinstance(model, PreTrainedModel):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, PreTrainedModel):
        return inner
    raise TypeError(f"{type(model).__name__} holds no transformers model")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant per-layer activation checkpointing (transformers' implementation).

    Recent transformers (5.23 here) renamed ``gradient_checkpointing_enable`` to
    ``activation_checkpointing_enable`` (the old name warns a FutureWarning); older ones only have the old name.
    """
    hf = hf_model(model)
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # older transformers
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    embedding = hf.get_input_embeddings()
    if not any(p.requires_grad for p in embedding.parameters()):
        hf.disable_input_require_grads()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (each once, tied weights counted once), in module order."""
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    """Number of trainable elements (what the planner's ``trainable_params`` predicts)."""
    return sum(p.numel() for p in trainable_parameters(model))
