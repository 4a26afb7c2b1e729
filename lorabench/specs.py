"""Frozen specifications shared by the planner, the runtime and the records (stdlib only).

A :class:`ModelSpec` is the architecture as the planner sees it: an inventory of the weight matrices of
one decoder layer plus the parameters outside the layers. It is derived from a Hugging Face
``config.json`` dict by :mod:`lorabench.architectures`; the runtime builds the same model from the same
dict, so the two cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

#: Bytes per element of the dtypes lorabench speaks about.
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4,
    "bf16": 2,
    "fp16": 2,
    "int8": 1,
    "nf4": 0.5,
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


@dataclass(frozen=True)
class OptimizerSpec:
    """Optimizer state layout.

    Attributes:
        name: ``adamw``, ``adamw_8bit``, ``paged_adamw``, ``paged_adamw_8bit``, ``sgd``, ``sgd_momentum``.
    """

    name: str = "adamw"

    @property
    def states_per_param(self) -> int:
        """Number of state tensors per parameter: Adam keeps m and v; SGD with momentum keeps one."""
        return {"sgd": 0, "sgd_momentum": 1}.get(self.name, 2)

    @property
    def state_bytes_per_element(self) -> float | None:
        """Bytes per state element; None means 'the parameter's own dtype' (torch's AdamW/SGD).

        8-bit optimizers (Dettmers et al. 2022, arXiv:2110.02861) store 1 byte per element plus one fp32
        absmax per block; bitsandbytes 0.50 uses blocks of 256: 1 + 4/256 bytes. (bitsandbytes keeps
        tensors under 4,096 elements in fp32; the planner ignores that small-tensor exception.)
        """
        if self.name.endswith("8bit"):
            return 1 + 4 / 256
        if self.name == "paged_adamw":  # fp32 states for any param dtype (docs/SOURCES.md#bnb-32bit-states)
            return 4.0
        return None

    @property
    def paged(self) -> bool:
        """Paged optimizers keep states in unified memory that can page out to the host under pressure."""
        return self.name.startswith("paged")


PRECISIONS: tuple[str, ...] = ("fp32", "bf16-mixed", "fp16-mixed", "bf16", "fp16")

#: Optimizer state layouts lorabench plans and runs (conf/optimizer/<name>.yaml for each).
OPTIMIZER_NAMES: tuple[str, ...] = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd", "sgd_momentum")

#: Hugging Face Trainer ``optim`` strings (transformers ``OptimizerNames``) -> (lorabench optimizer, AdamW
#: implementation it implies, None: the default). ``adamw_torch`` is torch's AdamW with its default
#: implementation (foreach on CUDA); ``adamw_torch_fused`` passes ``fused=True``.
OPTIMIZER_ALIASES: dict[str, tuple[str, str | None]] = {
    "adamw_torch": ("adamw", None),
    "adamw_torch_fused": ("adamw", "fused"),
    "adamw_bnb_8bit": ("adamw_8bit", None),
    "paged_adamw_32bit": ("paged_adamw", None),
}


def resolve_optimizer(name: str) -> tuple[str, str | None]:
    """(lorabench optimizer name, implied AdamW implementation or None) of a name or an HF ``optim`` alias."""
    return OPTIMIZER_ALIASES.get(name, (name, None))


@dataclass(frozen=True)
class TrainSpec:
    """One training configuration. Each field's docstring is its ``--help`` text (:mod:`lorabench.knobs`);
    ``conf/train/default.yaml`` lists the same fields (tests/test_conf.py checks)."""

    micro_batch_size: int = 1
    """Sequences per GPU per step (the micro-batch)."""
    seq_len: int = 512
    """Tokens per sequence."""
    precision: str = "bf16"
    """fp32 (fp32 weights and math); bf16-mixed / fp16-mixed (fp32 weights, matmuls autocast to 16 bit, the
    HF Trainer bf16=True set-up); bf16 / fp16 (the model stored in 16 bit; PEFT adapters stay fp32)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in backward, keeping only its input."""
    attention: str = "sdpa"
    """sdpa (memory-efficient/flash kernels: no s^2 buffer) or eager (materialized attention probabilities)."""
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    """Optimizer state layout."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (does not change peak memory)."""
    num_gpus: int = 1
    """Data-parallel GPUs (ranks)."""
    sharding: str = "none"
    """none, zero1 (optimizer states), zero2 (+ gradients) or zero3 (+ weights; FSDP full shard)."""
    master_weights: bool = False
    """Keep an fp32 master copy of 16-bit trainable weights in the optimizer."""
    allow_long_context: bool = False
    """Allow a seq_len above the model's max_position_embeddings (RoPE models only; learned positions never)."""
    adamw_impl: str = "foreach"
    """torch AdamW implementation: foreach (torch's CUDA default), fused or for-loop; they differ in the
    optimizer step's temporaries (lorabench.memory.optimizer_step)."""
    weights_dtype: str | None = None
    """The dtype the model is loaded in (torch_dtype: fp32, bf16, fp16); None: from precision."""
    autocast: str | None = None
    """none, bf16 or fp16: the torch.autocast dtype of the forward (the HF Trainer's bf16=True autocasts over
    whatever dtype the weights were loaded in); None: from precision. precision is the shorthand: fp32 =
    (fp32, none), bf16-mixed = (fp32, bf16), bf16 = (bf16, none)."""
    prepare_kbit: bool = False
    """PEFT's prepare_model_for_kbit_training: every parameter that is not 4-bit is cast to fp32, gradient
    checkpointing is on, and the input embeddings' output requires grad."""
    loader: str = "per-layer"
    """How a 4-bit model is loaded: per-layer (each weight quantized as it is read, at most one 16-bit matrix
    alive; transformers + bitsandbytes) or 16bit-first (the whole model materialized in 16 bit, then
    quantized); sets the load phase's peak (lorabench.memory.load)."""
    loss: str = "hf"
    """hf (transformers' full-sequence fp32 logits) or chunked (lm_head + cross-entropy over token chunks, no
    full-sequence logits; lorabench.memory.loss)."""
    stack: str = "lorabench"
    """Whose code builds and trains the model: lorabench (its own method modules and NF4 quantizer) or peft
    (transformers + PEFT + bitsandbytes: bitsandbytes' quantizer at load, PEFT's refusals; a recipe's stack).
    trace traces that stack's modules; run executes lorabench's only."""
    norm_dtype: str | None = None
    """dtype of the norm weights of a frozen base (fp32, bf16, fp16) after the method is applied; None: the
    other parameters' (param_dtype). The QLoRA paper's code casts every norm to fp32 after get_peft_model
    (recipe qlora-paper)."""

    #: CLI flags of a field when not ``--<field-with-dashes>`` (the first is the main one).
    FLAG_ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {
        "micro_batch_size": ("--batch", "--micro-batch"), "gradient_checkpointing": ("--checkpointing",
                                                                                     "--gradient-checkpointing"),
        "grad_accum_steps": ("--grad-accum",), "num_gpus": ("--gpus",)}
    #: Fields added after record schema 1 was first written: left out of a record at their default, so that
    #: records (and run ids) of configs that do not use them stay what they were.
    RECORD_OPTIONAL: ClassVar[dict[str, Any]] = {"allow_long_context": False, "adamw_impl": "foreach",
                                                 "weights_dtype": None, "autocast": None, "prepare_kbit": False,
                                                 "loader": "per-layer", "loss": "hf",
                                                 "stack": "lorabench", "norm_dtype": None}

    def to_record(self) -> dict[str, Any]:
        """The run record's ``config.train``: every field (optional ones only when set), the optimizer by name."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if self.RECORD_OPTIONAL.get(f.name, object()) != getattr(self, f.name)}
        out["optimizer"] = self.optimizer.name
        return out

    @classmethod
    def from_record(cls, values: Mapping[str, Any]) -> "TrainSpec":
        """Inverse of :meth:`to_record`; keys that are not fields (e.g. ``lr``) and None values are ignored."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names and v is not None}
        if isinstance(kwargs.get("optimizer"), str):
            kwargs["optimizer"] = OptimizerSpec(kwargs["optimizer"])
        for key in ("micro_batch_size", "seq_len", "grad_accum_steps", "num_gpus"):
            if key in kwargs:
                kwargs[key] = int(kwargs[key])
        return cls(**kwargs)

    @property
    def tokens_per_step(self) -> int:
        """Tokens processed per micro-step on one GPU: b * s."""
        return self.micro_batch_size * self.seq_len

    @property
    def load_dtype(self) -> str:
        """dtype the weights are loaded in: ``weights_dtype``, else the one ``precision`` implies."""
        return self.weights_dtype or {"bf16": "bf16", "fp16": "fp16"}.get(self.precision, "fp32")

    @property
    def param_dtype(self) -> str:
        """Storage dtype of the model's (non-quantized) weights while training: fp32 after prepare_kbit."""
        return "fp32" if self.prepare_kbit else self.load_dtype

    @property
    def norm_param_dtype(self) -> str:
        """Storage dtype of the norm weights while training: ``norm_dtype``, else :attr:`param_dtype`."""
        return self.norm_dtype or self.param_dtype

    @property
    def autocast_dtype(self) -> str | None:
        """The autocast dtype of the forward, None without autocast."""
        if self.autocast is not None:
            return None if self.autocast == "none" else self.autocast
        return {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}.get(self.precision)

    @property
    def compute_dtype(self) -> str:
        """dtype of matmul outputs/activations."""
        return self.autocast_dtype or self.param_dtype

    @property
    def label(self) -> str:
        """Short description of the precision set-up for headers: ``bf16-mixed`` or ``weights bf16 + autocast bf16``."""
        if self.weights_dtype is None and self.autocast is None and not self.prepare_kbit:
            return self.precision
        parts = [f"weights {self.load_dtype}" + (" -> fp32 (prepare_kbit)" if self.prepare_kbit else "")]
        parts.append(f"autocast {self.autocast_dtype or 'none'}")
        return " + ".join(parts)
