"""Frozen specifications shared by the planner, the runtime and the records (stdlib only).

A :class:`ModelSpec` is the architecture as the planner sees it: an inventory of the weight matrices of
one decoder layer plus the parameters outside the layers. It is derived from a Hugging Face
``config.json`` dict by :mod:`lorabench.architectures`; the runtime builds the same model from the same
dict, so the two cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

#: Bytes per element of the dtypes lorabench speaks about.
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4,
    "bf16": 2,
    "fp16": 2,
    "int8": 1,
    "nf4": 0.5,
    "int64": 8,
}

#: Module kinds used to split parameter counts (the same split the exact-count tests use).
PARAM_KINDS: tuple[str, ...] = ("embeddings", "attention", "mlp", "norms", "lm_head")


@dataclass(frozen=True)
class MatrixSpec:
    """One weight matrix of a decoder layer (an ``nn.Linear``/``Conv1D`` or a fused expert tensor).

    Attributes:
        name: module path inside the decoder layer, e.g. ``"self_attn.q_proj"``.
        in_features: input width of x @ W^T.
        out_features: output width.
        bias: whether the module has a bias vector of ``out_features``.
        kind: ``"attention"`` or ``"mlp"`` (experts and routers count as mlp).
        copies: number of such matrices (MoE experts), 1 for dense layers.
        is_linear: True for an ``nn.Linear``/``Conv1D`` module (what PEFT can target and what
            QLoRA quantizes); False for raw parameters such as fused expert tensors and routers.
        feedforward: True for the module PEFT's IA3 treats as feed-forward (scales its input).
        quantizable: whether QLoRA stores this matrix in NF4 (routers stay 16-bit).
    """

    name: str
    in_features: int
    out_features: int
    bias: bool
    kind: str
    copies: int = 1
    is_linear: bool = True
    feedforward: bool = False
    quantizable: bool = True

    @property
    def leaf(self) -> str:
        """Last component of the module path (what PEFT's ``target_modules`` lists match)."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def parameter_path(self) -> str:
        """The weight parameter's path inside the decoder layer (what PEFT's ``target_parameters`` match): a
        module's ``weight``, or the fused expert tensor itself (``mlp.experts.gate_up_proj``)."""
        return self.name if self.copies > 1 and not self.is_linear else f"{self.name}.weight"

    @property
    def weight_params(self) -> int:
        """Elements of the weight(s): copies * in * out."""
        return self.copies * self.in_features * self.out_features

    @property
    def bias_params(self) -> int:
        """Elements of the bias vector(s)."""
        return self.copies * self.out_features if self.bias else 0


@dataclass(frozen=True)
class ArchTraits:
    """What an architecture's modeling code does, as the planner, the methods and the runtime need it.

    Set once per ``model_type`` by :mod:`lorabench.architectures`; nothing else compares ``model_type``.
    """

    qkv: str = "separate"
    """``separate`` (q_proj, k_proj, v_proj), ``fused_views`` (GPT-2's c_attn split into three views of one
    storage, no RoPE) or ``fused_slices`` (Phi-3's qkv_proj sliced; RoPE makes new q and k, v stays a view)."""
    attn_in: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    """The attention input projection(s), in q, k, v order (one name when fused)."""
    attn_out: str = "self_attn.o_proj"
    """The attention output projection."""
    mlp: str = "gated"
    """``gated`` (down(act(gate(x)) * up(x))), ``fused_gated`` (Phi-3's gate_up_proj chunked in two),
    ``plain`` (GPT-2: proj(act(fc(x)))) or ``moe`` (routed experts)."""
    mlp_modules: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    """The MLP projections in forward order (gate, up, down / gate_up, down / fc, proj)."""
    hidden_act: str = "silu"
    """The MLP activation as the config names it (``gelu_new`` is GPT-2's tanh composite)."""
    post_norms: bool = False
    """Gemma-2: an extra RMSNorm after the attention and after the MLP, before each residual add."""
    rotary: bool = True
    """Rotary position embeddings applied to q and k (GPT-2 has learned absolute positions instead)."""
    conv1d: bool = False
    """Projections are transformers' ``Conv1D`` (weight stored (in, out): PEFT's fan_in_fan_out)."""
    supports_sdpa: bool = True
    """transformers runs the architecture with ``attn_implementation="sdpa"`` (not Gemma-2)."""
    final_logit_softcapping: bool = False
    """The LM head's logits go through tanh soft-capping (Gemma-2), which saves one more copy."""
    attn_logit_softcapping: bool = False
    """Eager attention scores go through tanh soft-capping (Gemma-2: cap * tanh(scores / cap)); tanh saves its
    output, one more batch x heads x q x kv tensor per layer."""
    lora_default_targets: tuple[str, ...] = ("q_proj", "v_proj")
    """PEFT's default LoRA target_modules for this model_type (peft.utils.constants)."""
    ia3_default_targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    """PEFT's default IA3 target_modules."""
    ia3_default_feedforward: tuple[str, ...] = ("down_proj",)
    """PEFT's default IA3 feedforward_modules."""
    peft_all_linear_parameters: tuple[tuple[str, int], ...] = ()
    """Raw parameters (layer matrix name, rank multiplier) that PEFT's ``all-linear`` also wraps through
    ``target_parameters`` on transformers 5 (Mixtral: router, and gate_up_proj at 2r; docs/SOURCES.md#peft-moe-conversion)."""

    @property
    def norms_per_layer(self) -> int:
        """Norm modules in one decoder layer: 2, or 4 with post-norms."""
        return 4 if self.post_norms else 2

    @property
    def default_attention(self) -> str:
        """sdpa where transformers supports it, else eager."""
        return "sdpa" if self.supports_sdpa else "eager"


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer as the planner needs it.

    Attributes:
        name: catalog name (``llama-2-7b``) or the path it was read from.
        model_type: Hugging Face ``model_type`` (``llama``, ``qwen2``, ``gpt2``...).
        vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim:
            the usual shape fields (``head_dim`` may differ from hidden/heads, e.g. Gemma-2).
        tie_word_embeddings: lm_head shares the embedding matrix (counted once).
        matrices: the weight matrices of ONE decoder layer.
        norm_params_per_layer: elements of all norm weights/biases in one layer.
        final_norm_params: elements of the final norm.
        position_embedding_params: learned absolute position embeddings (GPT-2's wpe), else 0.
        gated_mlp: SwiGLU/GeGLU (gate, up, down) rather than a plain 2-matrix MLP.
        norm_kind: ``rmsnorm`` or ``layernorm``.
        num_experts, experts_per_token: MoE routing (0 for dense models).
        max_position_embeddings: the longest context the config declares.
        display: human name for tables.
        traits: what the architecture's modeling code does (:class:`ArchTraits`).
        hf_config: the raw config dict the runtime builds the model from.
    """

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    matrices: tuple[MatrixSpec, ...]
    norm_params_per_layer: int
    final_norm_params: int
    position_embedding_params: int = 0
    gated_mlp: bool = True
    norm_kind: str = "rmsnorm"
    num_experts: int = 0
    experts_per_token: int = 0
    max_position_embeddings: int = 0
    display: str = ""
    traits: ArchTraits = field(default_factory=ArchTraits)
    hf_config: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    # ---- parameter counts (exact; tested against transformers on the meta device) ----
    @property
    def embedding_params(self) -> int:
        """Token embeddings V*h plus learned position embeddings."""
        return self.vocab_size * self.hidden_size + self.position_embedding_params

    @property
    def lm_head_params(self) -> int:
        """V*h for an untied head, 0 when tied to the embeddings (counted once)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def layer_params(self, kind: str | None = None) -> int:
        """Parameters of one decoder layer (weights + biases), optionally of one kind only."""
        total = sum(m.weight_params + m.bias_params for m in self.matrices if kind in (None, m.kind))
        if kind in (None, "norms"):
            total += self.norm_params_per_layer
        return total

    def params_by_kind(self) -> dict[str, int]:
        """Exact parameter counts split into :data:`PARAM_KINDS`."""
        return {
            "embeddings": self.embedding_params,
            "attention": self.num_layers * self.layer_params("attention"),
            "mlp": self.num_layers * self.layer_params("mlp"),
            "norms": self.num_layers * self.norm_params_per_layer + self.final_norm_params,
            "lm_head": self.lm_head_params,
        }

    @property
    def total_params(self) -> int:
        """All parameters, tied embeddings counted once."""
        return sum(self.params_by_kind().values())

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def has_fused_experts(self) -> bool:
        """Experts stored as raw 3-D parameters (Mixtral on transformers >= 5), which only LoRA's
        ``target_parameters`` can adapt."""
        return any(m.copies > 1 and not m.is_linear for m in self.matrices)

    def linear_matrices(self) -> tuple[MatrixSpec, ...]:
        """Matrices that are ``nn.Linear``/``Conv1D`` modules (PEFT targets, QLoRA-quantized)."""
        return tuple(m for m in self.matrices if m.is_linear)

    def quantized_matrices(self) -> tuple[MatrixSpec, ...]:
        """Matrices QLoRA stores in NF4: every layer matrix except routers (lm_head stays 16-bit)."""
        return tuple(m for m in self.matrices if m.quantizable)


@dataclass(frozen=True)
class GpuSpec:
    """An accelerator from conf/gpu/*.yaml (or the measured CPU entry in conf/cpu/*.yaml).

    Every number is cited in docs/SOURCES.md under the entry's ``spec_source`` / ``price_source`` key.

    Attributes:
        name: catalog name (``h100-80gb``).
        memory_bytes: usable device memory as the driver reports it (total, before the CUDA context).
        bf16_flops_per_s: dense bf16 tensor-core peak with FP32 accumulate (no sparsity), for MFU.
        memory_bandwidth_bytes_per_s: HBM/GDDR bandwidth.
        display: human name.
        aliases: other names the catalog resolves.
        fp16_flops_per_s: dense fp16 tensor peak with FP32 accumulate (what torch's matmuls use);
            0 means "same as bf16".
        fp32_flops_per_s: fp32 peak without TF32 (torch's default matmul precision); 0 means unknown.
        interconnect: link name (``nvlink4``, ``nvlink3-bridge``, ``pcie4``...).
        interconnect_bidirectional_bytes_per_s: GPU-to-GPU bandwidth per GPU as the vendor quotes it
            (both directions together; one direction carries half).
        pcie_bidirectional_bytes_per_s: the host link, used beyond the NVLink domain.
        nvlink_domain_gpus: GPUs one NVLink domain joins (8 on HGX boards, 2 with a bridge, 1 without).
        usd_per_hour: an on-demand price for one GPU (0 = none known), dated by ``price_date``.
        price_date: ISO date the price was listed.
        price_source, spec_source: keys of the entries in docs/SOURCES.md.
        kind: ``gpu``, or ``cpu`` for a measured CPU entry.
        kernel_overhead_s: measured fixed cost of one op (CPU entries); 0 = the calibration's default.
    """

    name: str
    memory_bytes: int
    bf16_flops_per_s: float
    memory_bandwidth_bytes_per_s: float
    display: str = ""
    aliases: tuple[str, ...] = ()
    fp16_flops_per_s: float = 0.0
    fp32_flops_per_s: float = 0.0
    interconnect: str = "pcie4"
    interconnect_bidirectional_bytes_per_s: float = 64e9
    pcie_bidirectional_bytes_per_s: float = 64e9
    nvlink_domain_gpus: int = 1
    usd_per_hour: float = 0.0
    price_date: str = ""
    price_source: str = ""
    spec_source: str = ""
    kind: str = "gpu"
    kernel_overhead_s: float = 0.0

    def peak_flops_per_s(self, compute_dtype: str) -> float:
        """Dense matmul peak for a compute dtype (``bf16``, ``fp16``, ``fp32``).

        fp32 falls back to bf16/16 when the entry has no fp32 figure (the tensor/CUDA-core ratio of
        A100/H100, 312/19.5 and 989/67, is ~15-16).
        """
        if compute_dtype == "fp16":
            return self.fp16_flops_per_s or self.bf16_flops_per_s
        if compute_dtype == "fp32":
            return self.fp32_flops_per_s or self.bf16_flops_per_s / 16
        return self.bf16_flops_per_s

    def link_bytes_per_s(self, num_gpus: int) -> float:
        """One-direction bandwidth per GPU for collectives over ``num_gpus``: NVLink inside its domain,
        else PCIe (the slowest link of a ring sets its speed)."""
        bidir = (self.interconnect_bidirectional_bytes_per_s if num_gpus <= self.nvlink_domain_gpus
                 else self.pcie_bidirectional_bytes_per_s)
        return bidir / 2


# Training-side specs live in lorabench.train_spec; re-exported here, where every module has found them.
from lorabench.train_spec import (OPTIMIZER_ALIASES, OPTIMIZER_NAMES, PRECISIONS, OptimizerSpec,  # noqa: E402,F401
                                  TrainSpec, resolve_optimizer)
