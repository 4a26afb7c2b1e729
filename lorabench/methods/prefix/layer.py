"""Prefix-tuning runtime (Li & Liang 2021, arXiv:2101.00190), laid out like PEFT's prefix tuning.

Every decoder layer attends over ``V`` trainable key/value positions before the ``T`` real tokens. With
``D = head_dim * num_key_value_heads`` (PEFT's token_dim rule for GQA, peft/utils/other.py
``_prepare_prompt_learning_config``; GPT-2 has no ``num_key_value_heads`` so ``D = n_embd``) and ``L`` layers:

- no projection: ``Embedding(V, 2*L*D)`` -> ``V * 2LD`` trainable parameters;
- projection: ``Embedding(V, D) -> Linear(D, H) -> tanh -> Linear(H, 2LD)`` with ``H = encoder_hidden_size``
  or ``D``: ``V*D + (D*H + H) + (H*2LD + 2LD)`` parameters.

Forward (PEFT's ``PeftModelForCausalLM.forward`` + ``get_prompt`` with transformers 5): the encoder output
(b, V, 2LD) in the adapter dtype is cast to the model's parameter dtype, viewed as
(b, V, 2L, n_kv, d) and permuted to per-layer (key, value) of shape (b, n_kv, V, d) (layer i: key = slice
2i, value = slice 2i+1); the attention mask, if any, gets V leading ones; positions run V..V+T-1 (RoPE and
GPT-2's learned positions both shift by V).

Differences from PEFT, on purpose (outputs are equal, tested):

- The prefix sits in a READ-ONLY cache (``update`` returns ``cat(prefix, new)`` and stores nothing) that a
  forward pre-hook hands to every attention module. PEFT fills a mutable ``DynamicCache``; transformers drops
  it inside checkpointed layers while the mask still spans V+T keys, so PEFT prefix tuning with gradient
  checkpointing fails (size mismatch; peft 0.21 + transformers 5.23, tried). Here checkpointing works and
  gives the same loss and gradients.
- Memory: the concatenated (b, n_kv, V+T, d) keys/values are held only by autograd (sdpa saves them), so
  each layer's are freed during its backward; PEFT's cache, returned in ``output.past_key_values``, keeps all
  of them until the output is dropped. The prefix (b, V, 2LD) itself lives until the end of the forward, or
  until the next step with checkpointing (the recompute reads it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from lorabench.methods.prefix.config import PrefixConfig
from lorabench.methods.common import adapter_torch_dtype, decoder_layers, freeze, torch_dtype
from lorabench.specs import ModelSpec, TrainSpec


def token_dim(spec: ModelSpec) -> int:
    """``D = head_dim * num_key_value_heads``: one layer's key (or value) prefix width per position.

    PEFT's rule; for GPT-2 (no ``num_key_value_heads``) PEFT takes ``n_embd``, which is the same number.
    """
    return spec.head_dim * spec.num_kv_heads


class PrefixEncoder(nn.Module):
    """PEFT's ``PrefixEncoder``: (b, V) virtual-token ids -> (b, V, 2*L*D) key/value prefixes."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, num_layers: int, *, prefix_projection: bool,
                 encoder_hidden_size: int | None, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        out = 2 * num_layers * token_dim
        self.prefix_projection = prefix_projection
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        if prefix_projection:
            hidden = encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **kw)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden, **kw), nn.Tanh(),
                                           nn.Linear(hidden, out, **kw))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out, **kw)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        tokens = self.embedding(prefix)
        return self.transform(tokens) if self.prefix_projection else tokens


class _PrefixLayer(DynamicLayer):
    """One layer's prefix as a cache layer that never grows: ``update`` returns ``cat(prefix, new)``."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys, values
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class PrefixCache(Cache):
    """Read-only cache of per-layer (key, value) prefixes; ``get_seq_length()`` is V for every layer."""

    def __init__(self, key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(layers=[_PrefixLayer(k, v) for k, v in key_values])


class _CacheSlot:
    """The cache of the current step, read by the attention pre-hooks (also during checkpoint recompute)."""

    cache: PrefixCache | None = None


class PrefixModel(nn.Module):
    """A causal LM with trainable key/value prefixes in every layer.

    Call it like the causal LM: ``out = prefix_model(input_ids, labels=labels)``; ``out.loss``/``out.logits``
    cover the T real tokens only.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, cfg: PrefixConfig, *, dtype: torch.dtype,
                 model_dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.num_virtual_tokens = cfg.num_virtual_tokens
        self.num_layers, self.token_dim = spec.num_layers, token_dim(spec)
        self.num_kv_heads, self.head_dim = spec.num_kv_heads, spec.head_dim
        self.model_dtype = model_dtype
        device = next(model.parameters()).device
        self.prompt_encoder = PrefixEncoder(cfg.num_virtual_tokens, self.token_dim, spec.num_layers,
                                            prefix_projection=cfg.prefix_projection,
                                            encoder_hidden_size=cfg.encoder_hidden_size, dtype=dtype,
                                            device=device)
        self.register_buffer("prompt_tokens", torch.arange(cfg.num_virtual_tokens, device=device),
                             persistent=False)
        self._slot = _CacheSlot()
        attn_name = spec.matrices[0].name.split(".")[0]  # "self_attn" (Llama family) or "attn" (GPT-2)
        for layer in decoder_layers(model):
            # The cache is read-only, so transformers may keep it inside checkpointed layers (no warning).
            layer._can_checkpoint_with_cache = True
            getattr(layer, attn_name).register_forward_pre_hook(self._hook(), with_kwargs=True)

    def _hook(self) -> Any:
        slot = self._slot

        def inject(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
            if slot.cache is not None:
                kwargs["past_key_values"] = slot.cache
            return args, kwargs

        return inject

    @property
    def config(self) -> Any:
        return self.model.config

    def prefix_key_values(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (key, value), each (batch, n_kv_heads, V, head_dim) in the model's parameter dtype."""
        tokens = self.prompt_tokens.unsqueeze(0).expand(batch_size, -1)
        kv = self.prompt_encoder(tokens).to(self.model_dtype)
        kv = kv.view(batch_size, self.num_virtual_tokens, 2 * self.num_layers, self.num_kv_heads, self.head_dim)
        per_layer = kv.permute(2, 0, 3, 1, 4).split(2)
        return [(layer[0], layer[1]) for layer in per_layer]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        batch, seq = input_ids.shape
        v = self.num_virtual_tokens
        cache = PrefixCache(self.prefix_key_values(batch))
        if attention_mask is not None:
            ones = torch.ones(batch, v, dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        position_ids = torch.arange(v, v + seq, device=input_ids.device).unsqueeze(0).expand(batch, -1)
        # Checkpoint recompute (in backward) reads the cache again, so keep it until the next step then.
        recompute = self.training and any(getattr(layer, "gradient_checkpointing", False)
                                          for layer in decoder_layers(self.model))
        self._slot.cache = cache
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, labels=labels, use_cache=False, **kwargs)
        finally:
            if not recompute:
                self._slot.cache = None
        out.past_key_values = None  # not a generation cache: do not keep the prefix alive with the output
        return out


def apply(model: nn.Module, spec: ModelSpec, cfg: PrefixConfig, train: TrainSpec) -> PrefixModel:
    """Freeze the model and wrap it in a :class:`PrefixModel`.

    Returns:
        A NEW module (the wrapper; the causal LM is its ``.model``): base parameters frozen in
        ``train.param_dtype``; the prefix encoder trainable in ``adapter_torch_dtype(cfg, train)`` (fp32 by
        default); its output is cast to ``train.param_dtype`` before entering attention.
    """
    freeze(model)
    return PrefixModel(model, spec, cfg, dtype=adapter_torch_dtype(cfg, train),
                       model_dtype=torch_dtype(train.param_dtype))
