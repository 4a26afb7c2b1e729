"""QLoRA runtime (Dettmers et al. 2023, arXiv:2305.14314): NF4 base linears + LoRA on top.

``apply`` replaces EVERY quantizable decoder-layer linear (``spec.quantized_matrices()``; GPT-2's Conv1D is
transposed to an ``nn.Linear`` first) by lorabench's ``Linear4bit`` (``cfg.backend == "lorabench"``) or by a
bitsandbytes ``Linear4bit`` (``"bitsandbytes"``), then wraps the LoRA targets (``all-linear`` by default,
as in the QLoRA paper) in :class:`~lorabench.methods.lora.layer.LoraLinear`. Embeddings, norms and lm_head
stay in the model's parameter dtype: unlike PEFT's ``prepare_model_for_kbit_training`` nothing is upcast
to fp32 (that would add 2 bytes/param of the non-quantized weights; not done, no knob).

dtypes: NF4 codes/constants as in ``lorabench.quant`` (uint8 codes, uint8/fp32 absmax, fp32 nested absmax
and offset); a quantized linear's bias is frozen in ``cfg.compute_dtype`` (lorabench backend) or keeps
the parameter dtype (bitsandbytes backend); LoRA A/B in ``cfg.adapter_dtype`` (fp32 by default).

The LoRA forward over the 4-bit layer is LoraLinear's (PEFT's ``lora.Linear``: add in the adapter dtype, then
cast back), not PEFT's bnb ``Linear4bit`` variant (which clones the base result and casts the LoRA output
to the result dtype before adding); the two agree up to one rounding of the 16-bit result.

Meta device: quantization cannot compute codes there, so :func:`empty_linear4bit` allocates
correctly-shaped, correctly-typed empty NF4 storage (byte counts equal ``nf4_storage_bytes``).

Real devices: :func:`materialize` takes the model the runtime built on meta and materializes it module by module,
quantizing each linear right after its random init, so a 70B QLoRA model never exists in 16 bit on the GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.errors import UserError, require
from lorabench.methods.common import (adapter_torch_dtype, freeze, init_on_device, is_conv1d, layer_module_paths,
                                      materialize_direct, replace_module, torch_dtype)
from lorabench.methods.lora.layer import lora_modules, wrap_all
from lorabench.methods.qlora.config import QLoraConfig
from lorabench.quant.linear4bit import Linear4bit
from lorabench.quant.nf4 import NF4Tensor
from lorabench.quant.sizes import DQ_BLOCKSIZE, NF4_BLOCKSIZE
from lorabench.specs import ModelSpec, TrainSpec



def empty_nf4(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, *, blocksize: int = NF4_BLOCKSIZE,
              double_quant: bool = True) -> NF4Tensor:
    """An uninitialised NF4 weight with exactly the storage ``quantize_nf4`` would allocate.

    packed ``ceil(n/2)`` uint8; absmax ``ceil(n/blocksize)`` uint8 codes (double quant) or fp32; nested
    absmax ``ceil(n_blocks/256)`` fp32 and a 0-dim fp32 offset (double quant only).
    """
    n = 1
    for size in shape:
        n *= int(size)
    n_blocks = -(-n // blocksize)
    packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=device)
    if not double_quant:
        return NF4Tensor(packed, torch.empty(n_blocks, dtype=torch.float32, device=device), torch.Size(shape),
                         dtype, blocksize)
    return NF4Tensor(packed, torch.empty(n_blocks, dtype=torch.uint8, device=device), torch.Size(shape), dtype,
                     blocksize, nested_absmax=torch.empty(-(-n_blocks // DQ_BLOCKSIZE), dtype=torch.float32,
                                                          device=device),
                     offset=torch.empty((), dtype=torch.float32, device=device), dq_blocksize=DQ_BLOCKSIZE)


def empty_linear4bit(linear: nn.Linear, cfg: QLoraConfig) -> Linear4bit:
    """The ``Linear4bit`` that quantizing ``linear`` would give, with empty storage (for meta tracing)."""
    weight = empty_nf4(tuple(linear.weight.shape), linear.weight.dtype, linear.weight.device,
                       blocksize=cfg.blocksize, double_quant=cfg.double_quant)
    return Linear4bit(weight, linear.bias, compute_dtype=torch_dtype(cfg.compute_dtype), dequant=cfg.dequant)


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` as an ``nn.Linear`` (GPT-2 Conv1D ``x @ W + b`` becomes ``x @ (W^T)^T + b``)."""
    if isinstance(module, nn.Linear):
        return module
    if not is_conv1d(module):
        raise UserError(f"cannot quantize a {type(module).__name__}", "qlora quantizes nn.Linear/Conv1D only")
    in_features, out_features = module.weight.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def is_4bit(module: nn.Module) -> bool:
    """lorabench's ``Linear4bit`` or bitsandbytes' ``bnb.nn.Linear4bit``."""
    return isinstance(module, Linear4bit) or type(module).__name__ == "Linear4bit"


def quantize_linear(module: nn.Module, cfg: QLoraConfig) -> nn.Module:
    """The 4-bit replacement of one linear (empty storage when the module lives on meta)."""
    linear = as_linear(module)
    compute = torch_dtype(cfg.compute_dtype)
    if cfg.backend == "bitsandbytes":
        require(linear.weight.device.type != "meta", "the bitsandbytes qlora backend cannot be built on meta",
                "trace with backend=lorabench (same NF4 storage)")
        from lorabench.quant.bnb_backend import bnb_linear4bit_from_linear

        return bnb_linear4bit_from_linear(linear, double_quant=cfg.double_quant, compute_dtype=compute)
    if linear.weight.device.type == "meta":
        return empty_linear4bit(linear, cfg)
    return Linear4bit.from_linear(linear, double_quant=cfg.double_quant, compute_dtype=compute,
                                  blocksize=cfg.blocksize, dequant=cfg.dequant)


def _check(spec: ModelSpec, cfg: QLoraConfig) -> None:
    fused = [m.name for m in spec.quantized_matrices() if not m.is_linear]
    require(not fused, f"qlora cannot quantize the fused expert tensors {fused} of {spec.name}",
            "use lora on this model, or a dense model for qlora")
    require(cfg.backend != "bitsandbytes" or cfg.blocksize == NF4_BLOCKSIZE,
            f"the bitsandbytes backend uses blocksize {NF4_BLOCKSIZE}, not {cfg.blocksize}", f"pass blocksize={NF4_BLOCKSIZE}")


def quantized_paths(model: nn.Module, spec: ModelSpec) -> list[str]:
    """Module paths (from the causal LM) of every linear QLoRA stores in NF4."""
    return [f"{layer}.{m.name}" for layer, _ in layer_module_paths(model) for m in spec.quantized_matrices()]


def apply(model: nn.Module, spec: ModelSpec, cfg: QLoraConfig, train: TrainSpec) -> nn.Module:
    """Quantize the base linears to NF4 and add LoRA to the targets (see the module docstring).

    Returns:
        ``model`` itself, mutated; the only trainable parameters are LoRA A/B.

    Raises:
        UserError: fused MoE experts (Mixtral), or the bitsandbytes backend with blocksize != 64 or on meta.
    """
    _check(spec, cfg)
    freeze(model)
    for path in quantized_paths(model, spec):
        module = model.get_submodule(path)
        if not is_4bit(module):  # materialize() may have quantized it already
            replace_module(model, path, quantize_linear(module, cfg))
    wrap_all(model, spec, cfg, adapter_torch_dtype(cfg, train))
    return model


# ------------------------------------------------------------------ building without a 16-bit copy

def materialize(model: nn.Module, spec: ModelSpec, cfg: QLoraConfig, train: TrainSpec, *, device: str,
                seed: int = 0) -> nn.Module:
    """The causal LM (built on meta by the runtime) with its quantizable linears in NF4 on ``device``,
    without ever holding a 16-bit copy of them.

    Every module is materialized on ``device`` and re-initialised by transformers' own ``_init_weights``
    (the init ``from_config`` uses), the rest first (a checkpoint's order: the load peak is the rest, the 4-bit
    layers so far and one 16-bit matrix, memory/load.py); each quantizable linear is quantized right after its
    init. Tied
    embeddings stay tied. ``apply`` then only adds LoRA.
    """
    _check(spec, cfg)
    torch.manual_seed(seed)
    targets = set(quantized_paths(model, spec))
    memo: dict[int, torch.Tensor] = {}
    # A checkpoint's order, as transformers loads it: the embeddings and norms first, then each linear.
    linears = {id(model.get_submodule(path)) for path in targets}
    init_on_device(model, device, memo, skip=lambda m: id(m) in linears or is_4bit(m))
    # By path, holding no module: each 16-bit weight is freed as soon as its 4-bit replacement exists (a list
    # of the modules, or a memo entry, would keep every 16-bit matrix alive until the end: a 16-bit-first peak).
    for path in [p for p, _ in model.named_modules() if p in targets]:
        module = model.get_submodule(path)
        materialize_direct(module, device, memo)
        with torch.no_grad():
            model._init_weights(module)
        replace_module(model, path, quantize_linear(module, cfg))
        memo = {key: t for key, t in memo.items() if not any(t is p for p in module.parameters(recurse=False))}
        del module
    return init_on_device(model, device, memo, skip=is_4bit)


# ------------------------------------------------------------------ merging

def dequantized_weight(base: nn.Module) -> torch.Tensor:
    """The (out, in) fp32 weight of a 4-bit layer (lorabench or bitsandbytes)."""
    if isinstance(base, Linear4bit):
        return base.dequantize(torch.float32)
    from lorabench.quant.bnb_backend import import_bitsandbytes

    bnb = import_bitsandbytes()
    return bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()


def merge_qlora(model: nn.Module, *, requantize: bool = False) -> nn.Module:
    """Fold every LoRA adapter over a 4-bit base into a new layer: ``W = dequant(W_nf4) + scaling * B A``.

    Args:
        requantize: store the merged weight in NF4 again (``Linear4bit``, same block size and double-quant
            setting); otherwise an ``nn.Linear`` in the layer's compute dtype.

    Returns:
        ``model``, mutated: the merged LoraLinear modules are gone (dense ones are merged in place instead).
    """
    for path, module in lora_modules(model):
        base = module.base_layer
        if module.use_dora:
            raise UserError("merging a DoRA adapter is not supported", "keep it unmerged, or train without use_dora")
        if not is_4bit(base):
            module.merge()
            continue
        compute = getattr(base, "compute_dtype", torch.bfloat16)
        with torch.no_grad():
            weight = dequantized_weight(base) + module.delta_weight().float()
            merged = nn.Linear(module.in_features, module.out_features, bias=base.bias is not None,
                               device=weight.device, dtype=compute)
            merged.weight.copy_(weight)
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        merged.requires_grad_(False)
        if requantize:
            w = base.weight if isinstance(base, Linear4bit) else None
            merged = Linear4bit.from_linear(merged, double_quant=True if w is None else w.double_quant,
                                            compute_dtype=compute, blocksize=NF4_BLOCKSIZE if w is None else w.blocksize)
        replace_module(model, path, merged)
    return model

