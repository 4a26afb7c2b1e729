"""The training side of a configuration (stdlib only): :class:`TrainSpec` and :class:`OptimizerSpec`.

Re-exported by :mod:`lorabench.specs`. Each TrainSpec field's docstring is its ``--help`` text
(:mod:`lorabench.knobs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping


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
