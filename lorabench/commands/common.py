"""Flags shared by ``plan``, ``compare`` and ``trace``: model, method knobs, training and hardware."""

from __future__ import annotations

import argparse
from typing import Any

from lorabench.catalog import load_gpu, load_model
from lorabench.errors import UserError
from lorabench.methods import METHOD_NAMES, MethodConfig, get as get_method, knob_names, make_config
from lorabench.recipes import Recipe, check_stack, load_recipe
from lorabench.memory.optimizer_step import ADAMW_IMPLS
from lorabench.specs import OPTIMIZER_ALIASES, OPTIMIZER_NAMES, resolve_optimizer
from lorabench.specs import PRECISIONS, GpuSpec, ModelSpec, OptimizerSpec, TrainSpec
OPTIMIZERS = OPTIMIZER_NAMES + tuple(OPTIMIZER_ALIASES)
FORMATS = ("table", "markdown", "json", "csv")

#: CLI flag -> method-config field (None default = the method's own default).
METHOD_KNOBS: tuple[tuple[str, str, Any, str], ...] = (
    ("--r", "r", int, "LoRA rank (lora, qlora; default 8)"),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha (default 8; scaling alpha/r)"),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout p (default 0)"),
    ("--target-modules", "target_modules", str, "comma-separated module suffixes or 'all-linear' (lora, qlora, ia3)"),
    ("--feedforward-modules", "feedforward_modules", str, "IA3 modules that scale their input"),
    ("--compute-dtype", "compute_dtype", str, "QLoRA dequantization dtype (bf16, fp16, fp32)"),
    ("--blocksize", "blocksize", int, "NF4 block size (default 64)"),
    ("--backend", "backend", str, "QLoRA 4-bit layer: lorabench or bitsandbytes"),
    ("--dequant", "dequant", str, "QLoRA (lorabench backend) dequantization: auto, triton or torch"),
    ("--num-virtual-tokens", "num_virtual_tokens", int, "prefix length (default 20)"),
    ("--encoder-hidden-size", "encoder_hidden_size", int, "prefix projection width (default: token dim)"),
    ("--reduction-factor", "reduction_factor", int, "adapter bottleneck = hidden // factor (default 16)"),
    ("--placement", "placement", str, "adapters: double_seq_bn (Houlsby) or seq_bn (Pfeiffer)"),
    ("--adapter-dtype", "adapter_dtype", str, "dtype of adapter weights (default fp32, PEFT's upcast)"),
)
METHOD_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--rslora", "use_rslora", "rank-stabilized scaling alpha/sqrt(r)"),
    ("--prefix-projection", "prefix_projection", "prefix tuning through an MLP reparameterization"),
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def add_model_arg(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required,
                        help="catalog name or alias (7b, 70b, llama-3.1-8b...) or a path to a HF config.json")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--batch", "--micro-batch", dest="micro_batch_size", type=_positive_int, default=1,
                   help="micro-batch per GPU (default 1)")
    g.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per sequence (default 512)")
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="default: bf16-mixed for full (fp32 master params), bf16 for the others")
    g.add_argument("--recipe", default=None, metavar="NAME",
                   help="a stack's defaults (conf/recipe/NAME.yaml; `lorabench recipes` lists them); explicit flags win")
    g.add_argument("--checkpointing", "--gradient-checkpointing", dest="gradient_checkpointing", action="store_true",
                   default=None, help="recompute each layer in backward")
    g.add_argument("--attention", choices=("sdpa", "eager"), default=None,
                   help="default sdpa (eager for Gemma-2, which transformers runs without sdpa)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None, metavar="OPTIMIZER",
                   help=f"one of {', '.join(OPTIMIZER_NAMES)}, or an HF Trainer optim string "
                        f"({', '.join(OPTIMIZER_ALIASES)}); default adamw")
    g.add_argument("--adamw-impl", choices=ADAMW_IMPLS, default=None,
                   help="torch AdamW implementation: foreach (default, torch on CUDA), fused, for-loop")
    g.add_argument("--loss", choices=("hf", "chunked"), default="hf",
                   help="hf (transformers' full-sequence fp32 logits, default) or chunked (no full logits)")
    g.add_argument("--grad-accum", dest="grad_accum_steps", type=_positive_int, default=1,
                   help="micro-batches per optimizer step (does not change peak memory)")
    g.add_argument("--master-weights", action="store_true", help="fp32 master copy of 16-bit trainable weights")
    g.add_argument("--weights-dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="dtype the model is loaded in (torch_dtype); default: from --precision")
    g.add_argument("--autocast", choices=("none", "bf16", "fp16"), default=None,
                   help="torch.autocast dtype of the forward (HF Trainer bf16=True); default: from --precision")
    g.add_argument("--prepare-kbit", action="store_true", default=None,
                   help="PEFT prepare_model_for_kbit_training: non-4-bit params in fp32, checkpointing on, "
                        "input embeddings' output requires grad")
    g.add_argument("--loader", choices=("per-layer", "16bit-first"), default=None,
                   help="quantized models: quantize each weight as it loads (default) or load 16-bit first")
    g.add_argument("--allow-long-context", action="store_true",
                   help="allow --seq-len above the model's max_position_embeddings (RoPE models)")
    h = parser.add_argument_group("hardware")
    h.add_argument("--gpu", default=None, help="catalog GPU (h100, a100-40gb, 4090...); default: every GPU")
    h.add_argument("--gpus", dest="num_gpus", type=_positive_int, default=1, help="data-parallel GPUs")
    h.add_argument("--sharding", choices=("none", "zero1", "zero2", "zero3"), default="none")


def add_method_knobs(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("method knobs (PEFT names and defaults)")
    for flag, dest, kind, text in METHOD_KNOBS:
        g.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    for flag, dest, text in METHOD_FLAGS:
        g.add_argument(flag, dest=dest, action="store_true", default=None, help=text)
    g.add_argument("--no-double-quant", dest="double_quant", action="store_false", default=None,
                   help="QLoRA without double quantization of the absmax constants")


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    """--model, --method, every method knob, training and hardware flags."""
    add_model_arg(parser)
    parser.add_argument("--method", default=None, choices=METHOD_NAMES, metavar="METHOD",
                        help=f"one of {', '.join(METHOD_NAMES)} (required unless --recipe selects one)")
    add_method_knobs(parser)
    add_train_args(parser)


def method_knobs(args: argparse.Namespace) -> dict[str, Any]:
    names = [d for _, d, _, _ in METHOD_KNOBS] + [d for _, d, _ in METHOD_FLAGS] + ["double_quant"]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def default_attention(model: ModelSpec | None) -> str:
    """sdpa, except Gemma-2 (soft-capped logits: transformers only runs it with eager attention)."""
    return model.traits.default_attention if model is not None else "sdpa"


def optimizer_from_args(args: argparse.Namespace) -> tuple[OptimizerSpec, str]:
    """(optimizer, AdamW implementation): an HF alias implies its implementation unless --adamw-impl says."""
    name, implied = resolve_optimizer(_recipe_value(args, "optimizer") or "adamw")
    explicit = getattr(args, "adamw_impl", None)
    if explicit and implied and explicit != implied:
        raise UserError(f"--optimizer {_recipe_value(args, 'optimizer')} means --adamw-impl {implied}, not {explicit}",
                        f"drop --adamw-impl or pass --optimizer {name}")
    return OptimizerSpec(name), explicit or implied or "foreach"


def recipe_of(args: argparse.Namespace) -> Recipe | None:
    """The ``--recipe`` of the command line, None without one (UserError for an unknown name)."""
    name = getattr(args, "recipe", None)
    return load_recipe(name) if name else None


def _recipe_value(args: argparse.Namespace, dest: str, train_key: str | None = None) -> Any:
    """An explicit flag's value, else the recipe's (``train_key`` in its ``train`` block, or its method/optimizer)."""
    value = getattr(args, dest, None)
    recipe = recipe_of(args)
    if value is not None or recipe is None:
        return value
    if train_key is None:
        return getattr(recipe, dest)
    return recipe.train.get(train_key)


def method_from_args(args: argparse.Namespace) -> str:
    """--method, else the recipe's method."""
    method = _recipe_value(args, "method")
    if method is None:
        raise UserError("no method given", "pass --method (one of " + ", ".join(METHOD_NAMES) + ") or a --recipe that "
                        "selects one (`lorabench recipes`)")
    return str(method)


def train_from_args(args: argparse.Namespace, method: str, model: ModelSpec | None = None) -> TrainSpec:
    precision = _recipe_value(args, "precision", "precision") or get_method(method).default_precision
    optimizer, impl = optimizer_from_args(args)
    recipe = recipe_of(args)
    if getattr(args, "adamw_impl", None) is None and recipe is not None and "adamw_impl" in recipe.train:
        impl = recipe.train["adamw_impl"]
    prepare_kbit = bool(_recipe_value(args, "prepare_kbit", "prepare_kbit"))
    extra = {k: v for k, v in ((k, _recipe_value(args, k, k)) for k in ("weights_dtype", "autocast", "loader"))
             if v is not None}
    checkpointing = _recipe_value(args, "gradient_checkpointing", "gradient_checkpointing")
    return TrainSpec(**extra, prepare_kbit=prepare_kbit, micro_batch_size=args.micro_batch_size, seq_len=args.seq_len,
                     precision=precision,
                     # prepare_model_for_kbit_training turns gradient checkpointing on
                     gradient_checkpointing=bool(checkpointing) or prepare_kbit,
                     attention=args.attention or default_attention(model),
                     optimizer=optimizer, adamw_impl=impl, grad_accum_steps=args.grad_accum_steps,
                     num_gpus=args.num_gpus, sharding=args.sharding, master_weights=bool(args.master_weights),
                     allow_long_context=bool(args.allow_long_context), loss=getattr(args, "loss", "hf"))


def gpu_from_args(args: argparse.Namespace) -> GpuSpec | None:
    return load_gpu(args.gpu) if getattr(args, "gpu", None) else None


def specs_from_args(args: argparse.Namespace) -> tuple[ModelSpec, MethodConfig, TrainSpec]:
    """Resolve the model, the method config (with knobs) and the training spec; UserError on bad input."""
    model = load_model(args.model)
    name = method_from_args(args)
    method = make_config(name, knobs_with_recipe(args, name))
    train = train_from_args(args, name, model)
    recipe = recipe_of(args)
    if recipe is not None:
        check_stack(recipe.stack, method, train, get_method(name).estimator)
    return model, method, train


def knobs_with_recipe(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The recipe's method knobs that ``method`` has, under the explicit knob flags."""
    recipe = recipe_of(args)
    base = {k: v for k, v in (recipe.method_knobs if recipe else {}).items() if k in knob_names(method)}
    return {**base, **method_knobs(args)}


def add_format_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")


def add_cost_args(parser: argparse.ArgumentParser) -> None:
    """--tokens / --dataset-tokens --epochs and --usd-per-hour (time to train and cost)."""
    g = parser.add_argument_group("time and cost")
    g.add_argument("--tokens", type=float, default=None, help="tokens to train on (adds time to train and cost)")
    g.add_argument("--dataset-tokens", type=float, default=None, help="tokens in the dataset (with --epochs)")
    g.add_argument("--epochs", type=float, default=None, help="passes over --dataset-tokens (default 1)")
    g.add_argument("--usd-per-hour", type=float, default=None,
                   help="price of one GPU-hour (default: the GPU's dated on-demand catalog price)")


def budget_from_args(args: argparse.Namespace) -> Any:
    from lorabench.steptime.cost import TrainingBudget

    return TrainingBudget.from_flags(args.tokens, args.dataset_tokens, args.epochs, args.usd_per_hour)
