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
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lorabench.errors import UserError
from lorabench.methods import get as get_method
from lorabench.methods.base import MethodConfig
from lorabench.methods.common import (TORCH_DTYPES, adapter_torch_dtype, decoder_layers, freeze,  # noqa: F401
                                      layer_module_paths, replace_module, torch_dtype)
from lorabench.specs import ModelSpec, TrainSpec

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
    if train.attention == "sdpa" and not spec.traits.supports_sdpa:
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


def build_on_device(spec: ModelSpec, train: TrainSpec, *, device: str, seed: int = 0) -> PreTrainedModel:
    """:func:`build_model` for an accelerator: built on meta (no storage, no init), ``to_empty`` on ``device``,
    then transformers' own whole-model init there (``init_weights``: the init ``from_config`` runs, in its
    order, so parent-level rules such as GPT-2's scaled ``c_proj`` apply) after ``torch.manual_seed(seed)``,
    and the tied weights tied again. Nothing is allocated or initialised on the CPU for a CUDA model."""
    model = build_model(spec, train, device="meta", seed=seed)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    model.tie_weights()
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


def prepare_model(spec: ModelSpec, method_cfg: MethodConfig, train: TrainSpec, *, device: str = "cpu",
                  seed: int = 0) -> nn.Module:
    """Build the model, apply the method, then enable gradient checkpointing if asked.

    The method's runtime (``get_method(name).load_runtime()``, a
    :class:`~lorabench.methods.protocols.MethodRuntime`) applies it: ``apply(model, spec, cfg, train)``. A
    runtime may also define ``materialize(meta_model, spec, cfg, train, *, device, seed)`` to turn the model
    built on meta into real tensors itself (QLoRA does: it quantizes each linear right after its init, so the
    16-bit model never exists in full; on meta nothing needs materializing). Prefix tuning
    returns a wrapper module (``PrefixModel``) around the causal LM; every other method returns the causal LM
    itself, mutated. Checkpointing is transformers' own, non-reentrant (``use_reentrant=False``): it needs no
    input-requires-grad hook, so transformers' hook is removed again when the input embedding is frozen
    (otherwise backward would compute a useless gradient for the first layer's input).

    Args:
        spec, method_cfg, train: what to build.
        device: ``"cpu"``, ``"cuda"`` or ``"meta"`` (every method, QLoRA included, works on meta).
        seed: random init seed (base weights, then adapter init).
    """
    runtime = get_method(method_cfg.name).load_runtime()
    materialize = getattr(runtime, "materialize", None)
    if materialize is not None and device != "meta":
        model = materialize(build_model(spec, train, device="meta", seed=seed), spec, method_cfg, train,
                            device=device, seed=seed)
    elif torch.device(device).type not in ("cpu", "meta"):  # a GPU: never a CPU init of the full model
        model = build_on_device(spec, train, device=device, seed=seed)
    else:
        model = build_model(spec, train, device=device, seed=seed)
    model = runtime.apply(model, spec, method_cfg, train)
    cast_norms(model, train.norm_dtype)
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(model, input_require_grads=train.prepare_kbit)
    return model


def is_norm(module: nn.Module) -> bool:
    """A normalization layer: ``nn.LayerNorm`` or a class named ``*Norm`` (transformers' ``LlamaRMSNorm``...)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


def cast_norms(model: nn.Module, dtype: str | None) -> int:
    """Cast every norm layer's parameters to ``dtype`` in place, one module at a time (``module.to(dtype)``,
    what the QLoRA paper's code does after ``get_peft_model``: docs/SOURCES.md#qlora-guanaco); None casts
    nothing. Returns the number of norm elements (``ModelSpec``'s ``norms`` count, tests/runtime)."""
    if dtype is None:
        return 0
    norms = [m for m in model.modules() if is_norm(m)]
    for module in norms:
        module.to(torch_dtype(dtype))
    return sum(p.numel() for m in norms for p in m.parameters(recurse=False))


def hf_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model`` (itself, or the ``.model`` of a wrapper such as PrefixModel)."""
    if isinstance(model, PreTrainedModel):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, PreTrainedModel):
        return inner
    raise TypeError(f"{type(model).__name__} holds no transformers model")


def enable_gradient_checkpointing(model: nn.Module, input_require_grads: bool = False) -> None:
    """Non-reentrant per-layer activation checkpointing (transformers' implementation).

    ``input_require_grads`` keeps transformers' hook that makes the input embeddings' output require grad
    (what PEFT's ``prepare_model_for_kbit_training`` installs, ``TrainSpec.prepare_kbit``); otherwise the hook
    is removed when the embedding is frozen.

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
    if input_require_grads:
        hf.enable_input_require_grads()
    elif not any(p.requires_grad for p in embedding.parameters()):
        hf.disable_input_require_grads()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (each once, tied weights counted once), in module order."""
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    """Number of trainable elements (what the planner's ``trainable_params`` predicts)."""
    return sum(p.numel() for p in trainable_parameters(model))
