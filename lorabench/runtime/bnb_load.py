"""A model loaded in 4-bit the way ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))``
does it, with random weights in place of a checkpoint: the PEFT stack's real (measured) QLoRA runs.

transformers builds the skeleton on meta with ``replace_with_bnb_linear`` (every ``nn.Linear`` but
``lm_head`` becomes a ``bnb.nn.Linear4bit``; raw parameters such as Mixtral's fused experts stay 16-bit),
then loads the checkpoint tensor by tensor, each linear weight through its quantizer's own op
(``Bnb4bitQuantize``: ``Params4bit(value).to(device)``, which quantizes on that device). Here every other
module is materialized and initialised on the device by transformers' ``_init_weights`` (lorabench's
``init_on_device``), and each linear weight is drawn from N(0, initializer_range) on the device in the load
dtype, then handed to the same op. The 16-bit model never exists in full (docs/SOURCES.md#bnb-quantize-scratch).
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.methods.common import init_on_device
from lorabench.specs import ModelSpec, TrainSpec


def load_4bit(spec: ModelSpec, train: TrainSpec, *, double_quant: bool, compute_dtype: torch.dtype,
              device: str, seed: int = 0) -> nn.Module:
    """The causal LM of ``spec`` with bitsandbytes NF4 linears on ``device`` (see the module docstring).

    Returns:
        The model, marked ``is_loaded_in_4bit`` (what PEFT's ``prepare_model_for_kbit_training`` reads).
    """
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.auto import AutoHfQuantizer

    from lorabench.quant.bnb_backend import import_bitsandbytes
    from lorabench.runtime.build import TORCH_DTYPES, build_model

    bnb = import_bitsandbytes()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                               bnb_4bit_use_double_quant=double_quant)
    model = replace_with_bnb_linear(build_model(spec, train, device="meta", seed=seed),
                                    modules_to_not_convert=["lm_head"], quantization_config=quant)
    torch.manual_seed(seed)
    init_on_device(model, device, skip=lambda m: isinstance(m, bnb.nn.Linear4bit))
    op = AutoHfQuantizer.from_config(quant).get_quantize_ops()
    std = float(getattr(model.config, "initializer_range", 0.02))
    dtype = TORCH_DTYPES[train.load_dtype]
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        value = torch.empty(tuple(module.weight.shape), dtype=dtype, device=device).normal_(0.0, std)
        module.weight = op.convert({f"{name}.weight": value}, model=model)[f"{name}.weight"]
        del value
        if module.bias is not None:
            module.bias = nn.Parameter(torch.zeros(module.bias.shape, dtype=dtype, device=device), requires_grad=False)
    model.tie_weights()
    model.is_loaded_in_4bit = True
    return model
