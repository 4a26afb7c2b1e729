"""Hugging Face config dict -> :class:`~lorabench.specs.ModelSpec` (stdlib only).

Each supported ``model_type`` lists the weight matrices of one decoder layer exactly as transformers
builds them (module names, shapes, biases), so that parameter counts are exact and PEFT-style
``target_modules`` can be matched by name. Tested against transformers models built on the meta device.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping

from lorabench.errors import UserError, require
from lorabench.specs import ArchTraits, MatrixSpec, ModelSpec

Config = Mapping[str, Any]


def _get(cfg: Config, *keys: str, default: Any = None) -> Any:
    """The first of ``keys`` present (not null) in ``cfg``; a number must be a JSON integer, not a string."""
    for key in keys:
        if cfg.get(key) is not None:
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"config field {key}={value!r} is not an integer",
                                f"write {key} as a JSON number, as transformers saves it")
            return value
    return default


def _int(cfg: Config, key: str) -> int:
    value = _get(cfg, key)
    if value is None:
        raise KeyError(key)
    return int(value)


def _attention(cfg: Config, h: int, n_heads: int, n_kv: int, d: int, qkv_bias: bool, o_bias: bool) -> list[MatrixSpec]:
    """q/k/v/o projections of Llama-family attention (GQA: k,v have n_kv*d outputs)."""
    return [
        MatrixSpec("self_attn.q_proj", h, n_heads * d, qkv_bias, "attention"),
        MatrixSpec("self_attn.k_proj", h, n_kv * d, qkv_bias, "attention"),
        MatrixSpec("self_attn.v_proj", h, n_kv * d, qkv_bias, "attention"),
        MatrixSpec("self_attn.o_proj", n_heads * d, h, o_bias, "attention"),
    ]


def _gated_mlp(h: int, inter: int, bias: bool, prefix: str = "mlp") -> list[MatrixSpec]:
    """SwiGLU/GeGLU MLP: down(act(gate(x)) * up(x)) (Shazeer 2020, arXiv:2002.05202)."""
    return [
        MatrixSpec(f"{prefix}.gate_proj", h, inter, bias, "mlp"),
        MatrixSpec(f"{prefix}.up_proj", h, inter, bias, "mlp"),
        MatrixSpec(f"{prefix}.down_proj", inter, h, bias, "mlp", feedforward=True),
    ]


def _shape(cfg: Config) -> tuple[int, int, int, int, int, int]:
    h = _int(cfg, "hidden_size")
    n_heads = _int(cfg, "num_attention_heads")
    n_kv = int(_get(cfg, "num_key_value_heads", default=n_heads))
    _check_heads(h, n_heads, n_kv, explicit_head_dim=cfg.get("head_dim") is not None)
    d = int(_get(cfg, "head_dim", default=h // n_heads))
    require(d > 0, f"config has head_dim={d}", "head_dim must be a positive integer (or omit it)")
    return h, n_heads, n_kv, d, _int(cfg, "intermediate_size"), _int(cfg, "num_hidden_layers")


def _check_heads(h: int, n_heads: int, n_kv: int, explicit_head_dim: bool) -> None:
    """What transformers' attention needs: heads > 0, kv heads dividing the heads (GQA groups), and, without
    an explicit ``head_dim``, heads dividing the hidden size."""
    require(n_heads > 0 and n_kv > 0, f"config has num_attention_heads={n_heads}, num_key_value_heads={n_kv}",
            "both must be positive integers")
    require(n_heads % n_kv == 0, f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}",
            "use a number of key/value heads that divides the number of heads")
    require(explicit_head_dim or h % n_heads == 0,
            f"hidden_size={h} is not divisible by num_attention_heads={n_heads}",
            "fix the config (or give head_dim explicitly, as Gemma-2 does)")


def _llama_like(cfg: Config, qkv_bias: bool, norms_per_layer: int) -> dict[str, Any]:
    h, n_heads, n_kv, d, inter, n_layers = _shape(cfg)
    attn_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    mats = _attention(cfg, h, n_heads, n_kv, d, qkv_bias or attn_bias, attn_bias) + _gated_mlp(h, inter, mlp_bias)
    return dict(hidden_size=h, num_heads=n_heads, num_kv_heads=n_kv, head_dim=d, intermediate_size=inter,
                num_layers=n_layers, matrices=tuple(mats), norm_params_per_layer=norms_per_layer * h,
                final_norm_params=h)


def _llama(cfg: Config) -> dict[str, Any]:
    return _llama_like(cfg, qkv_bias=False, norms_per_layer=2)


def _qwen2(cfg: Config) -> dict[str, Any]:
    # Qwen2 always has q/k/v biases and no o_proj bias.
    return _llama_like(cfg, qkv_bias=True, norms_per_layer=2)


def _gemma2(cfg: Config) -> dict[str, Any]:
    # Four RMSNorms per layer: input, post-attention, pre-feedforward, post-feedforward.
    return _llama_like(cfg, qkv_bias=False, norms_per_layer=4)


def _phi3(cfg: Config) -> dict[str, Any]:
    h, n_heads, n_kv, d, inter, n_layers = _shape(cfg)
    mats = (
        MatrixSpec("self_attn.qkv_proj", h, (n_heads + 2 * n_kv) * d, False, "attention"),
        MatrixSpec("self_attn.o_proj", n_heads * d, h, False, "attention"),
        MatrixSpec("mlp.gate_up_proj", h, 2 * inter, False, "mlp"),
        MatrixSpec("mlp.down_proj", inter, h, False, "mlp", feedforward=True),
    )
    return dict(hidden_size=h, num_heads=n_heads, num_kv_heads=n_kv, head_dim=d, intermediate_size=inter,
                num_layers=n_layers, matrices=mats, norm_params_per_layer=2 * h, final_norm_params=h)


def _mixtral(cfg: Config) -> dict[str, Any]:
    h, n_heads, n_kv, d, inter, n_layers = _shape(cfg)
    n_exp = _int(cfg, "num_local_experts")
    # transformers >= 5 fuses the experts into two 3-D parameters and the router into a raw parameter.
    # 4-bit loading (bitsandbytes) replaces nn.Linear modules only, so they stay 16-bit under QLoRA
    # (docs/SOURCES.md#bnb-fused-experts); lorabench's QLoRA does the same.
    mats = _attention(cfg, h, n_heads, n_kv, d, False, False) + [
        MatrixSpec("mlp.gate", h, n_exp, False, "mlp", is_linear=False, quantizable=False),
        MatrixSpec("mlp.experts.gate_up_proj", h, 2 * inter, False, "mlp", copies=n_exp, is_linear=False,
                   quantizable=False),
        MatrixSpec("mlp.experts.down_proj", inter, h, False, "mlp", copies=n_exp, is_linear=False,
                   feedforward=True, quantizable=False),
    ]
    return dict(hidden_size=h, num_heads=n_heads, num_kv_heads=n_kv, head_dim=d, intermediate_size=inter,
                num_layers=n_layers, matrices=tuple(mats), norm_params_per_layer=2 * h, final_norm_params=h,
                num_experts=n_exp, experts_per_token=int(_get(cfg, "num_experts_per_tok", default=2)))


def _gpt2(cfg: Config) -> dict[str, Any]:
    h = int(_get(cfg, "n_embd", "hidden_size"))
    n_layers = int(_get(cfg, "n_layer", "num_hidden_layers"))
    n_heads = int(_get(cfg, "n_head", "num_attention_heads"))
    _check_heads(h, n_heads, n_heads, explicit_head_dim=False)
    inter = int(_get(cfg, "n_inner", default=4 * h))
    # Conv1D modules: weight stored (in, out), still x @ W + b; all have biases.
    mats = (
        MatrixSpec("attn.c_attn", h, 3 * h, True, "attention"),
        MatrixSpec("attn.c_proj", h, h, True, "attention"),
        MatrixSpec("mlp.c_fc", h, inter, True, "mlp"),
        MatrixSpec("mlp.c_proj", inter, h, True, "mlp", feedforward=True),
    )
    n_pos = int(_get(cfg, "n_positions", "max_position_embeddings", default=1024))
    # Two LayerNorms per layer (weight + bias), one final LayerNorm.
    return dict(hidden_size=h, num_heads=n_heads, num_kv_heads=n_heads, head_dim=h // n_heads,
                intermediate_size=inter, num_layers=n_layers, matrices=mats, norm_params_per_layer=4 * h,
                final_norm_params=2 * h, position_embedding_params=n_pos * h, gated_mlp=False,
                norm_kind="layernorm", max_position_embeddings=n_pos)


_PARSERS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _qwen2,
    "gemma2": _gemma2,
    "phi3": _phi3,
    "mixtral": _mixtral,
    "gpt2": _gpt2,
}

#: Default tie_word_embeddings per model_type (transformers' config defaults).
_TIED_DEFAULT = {"gpt2": True, "gemma2": True}

_GPT2_TRAITS = ArchTraits(qkv="fused_views", attn_in=("attn.c_attn",), attn_out="attn.c_proj", mlp="plain",
                          mlp_modules=("mlp.c_fc", "mlp.c_proj"), hidden_act="gelu_new", conv1d=True, rotary=False,
                          lora_default_targets=("c_attn",), ia3_default_targets=("c_attn", "mlp.c_proj"),
                          ia3_default_feedforward=("mlp.c_proj",))

#: Traits per model_type. PEFT's default targets: peft.utils.constants (TRANSFORMERS_MODELS_TO_*_MAPPING,
#: peft 0.21); where PEFT has none (phi3; mixtral's fused experts in transformers >= 5) the choice is
#: lorabench's: the fused qkv is the analogue of q,v, and PEFT's 'w2' no longer exists.
_TRAITS: dict[str, ArchTraits] = {
    "llama": ArchTraits(),
    "mistral": ArchTraits(),
    "qwen2": ArchTraits(ia3_default_targets=("q_proj", "v_proj", "down_proj")),
    "gemma2": ArchTraits(post_norms=True, supports_sdpa=False,
                         ia3_default_targets=("q_proj", "v_proj", "down_proj")),
    "phi3": ArchTraits(qkv="fused_slices", attn_in=("self_attn.qkv_proj",), mlp="fused_gated",
                       mlp_modules=("mlp.gate_up_proj", "mlp.down_proj"), lora_default_targets=("qkv_proj",),
                       ia3_default_targets=("qkv_proj", "down_proj")),
    "mixtral": ArchTraits(mlp="moe", mlp_modules=(), ia3_default_targets=("k_proj", "v_proj"),
                          ia3_default_feedforward=(),
                          peft_all_linear_parameters=(("mlp.gate", 1), ("mlp.experts.gate_up_proj", 2),
                                                      ("mlp.experts.down_proj", 1))),
    "gpt2": _GPT2_TRAITS,
}


def _traits(model_type: str, cfg: Config) -> ArchTraits:
    """The model_type's traits, with the activation and soft-capping the config itself declares."""
    base = _TRAITS[model_type]
    act = next((str(cfg[k]) for k in ("activation_function", "hidden_activation", "hidden_act")
                if cfg.get(k) is not None), base.hidden_act)
    return replace(base, hidden_act=act, final_logit_softcapping=bool(cfg.get("final_logit_softcapping")),
                   attn_logit_softcapping=bool(cfg.get("attn_logit_softcapping")))

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_PARSERS))


def spec_from_hf_config(cfg: Config, name: str, display: str = "") -> ModelSpec:
    """Build a :class:`ModelSpec` from a Hugging Face ``config.json`` dict.

    Raises:
        UserError: unsupported ``model_type`` or a missing/invalid field.
    """
    model_type = str(cfg.get("model_type", ""))
    if model_type not in _PARSERS:
        raise UserError(f"model_type {model_type!r} in {name} is not supported",
                        f"lorabench knows {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        fields = _PARSERS[model_type](cfg)
        vocab = _int(cfg, "vocab_size")
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"config {name} lacks a valid field {err}", "pass a complete Hugging Face config.json") from None
    for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
        require(fields[key] > 0, f"config {name} has {key}={fields[key]}", "every size must be a positive integer")
    require(vocab > 0, f"config {name} has vocab_size={vocab}", "vocab_size must be a positive integer")
    fields.setdefault("max_position_embeddings", int(_get(cfg, "max_position_embeddings", default=0)))
    return ModelSpec(
        name=name,
        model_type=model_type,
        vocab_size=vocab,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", _TIED_DEFAULT.get(model_type, False))),
        display=display or name,
        traits=_traits(model_type, cfg),
        hf_config=dict(cfg),
        **fields,
    )
