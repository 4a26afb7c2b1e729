"""LoRA on raw parameters (``target_parameters``): Mixtral's fused expert tensors and its router.

transformers >= 5 keeps Mixtral's experts as two 3-D parameters per layer (``gate_up_proj``: E x 2I x h,
``down_proj``: E x h x I, each expert's slice an (out, in) weight) and the router as a raw (E x h) weight,
so no ``nn.Linear`` exists to wrap. :class:`ParamLora` adapts one such parameter with PEFT's
``ParamWrapper`` layout (docs/SOURCES.md#peft-param-fold), so adapters load in either library:

* lora_A is an (r E x in) and lora_B an (out x r E) weight; expert e's factors are A's rows e r .. e r + r - 1
  (reshape to E x r x in) and B's columns r_i E + e (reshape to out x r x E, then experts first);
* for the forward of the module holding the parameter, the parameter is replaced (a torch parametrization,
  cached for that forward) by ``W' = baddbmm(W, B_e, A_e, alpha=scaling)``, computed in W's dtype with the
  factors cast to it and autocast off; a 2-D parameter gets ``W + (B A * scaling).to(W.dtype)``.
  The module then runs unchanged on W' (transformers' own expert kernels), and autograd carries W's
  gradient back to A and B.

Unlike PEFT, the parametrization is registered with ``unsafe=True``: PEFT's safe registration evaluates the
fold once more to check its shape and dtype, i.e. two folds of every adapted expert tensor per forward.
Two parameters of one module nest (the wrapper of the later-registered parameter outside), as in PEFT, which
fixes the file keys: ``mlp.experts.lora_A.weight`` (down_proj) and ``mlp.experts.base_layer.lora_A.weight``
(gate_up_proj). Memory: :mod:`lorabench.methods.lora.experts_memory`. With ``experts_path="routed"`` the
outermost wrapper of an experts module runs :mod:`lorabench.methods.lora.experts_routed` instead of folding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lorabench.errors import UserError
from lorabench.methods.common import UninitLinear, layer_module_paths, replace_module
from lorabench.specs import MatrixSpec


class _Fold(nn.Module):
    """The parametrization: maps the stored parameter to its folded value (holds no module, no cycle)."""

    def __init__(self, owner: "ParamLora") -> None:
        super().__init__()
        self.__dict__["owner"] = owner  # a plain attribute: the owner is not a submodule of the parametrization

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.__dict__["owner"].folded(weight)


class ParamLora(nn.Module):
    """A trainable low-rank update of one raw parameter of ``base_layer`` (or of the module it wraps).

    Args:
        base_layer: the module holding the parameter, or another ParamLora around it.
        parameter_name: the parameter's attribute name on that module (``gate_up_proj``, ``weight``).
        r, lora_alpha, use_rslora: LoRA hyper-parameters; every expert gets rank r.
        dtype: dtype of lora_A / lora_B (fp32 by default, as PEFT's autocast_adapter_dtype=True).
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str, *, r: int, lora_alpha: float,
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32, routed: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routed = routed
        self.parameter_name = parameter_name
        param = self.parameter()
        self.transposed = False
        if param.ndim == 3:  # (E, out, in), or (E, in, out) where the module says is_transposed
            self.transposed = bool(getattr(self.raw_module(), "is_transposed", False))
            experts, rows, cols = param.shape
            in_features, out_features = (rows, cols) if self.transposed else (cols, rows)
        elif param.ndim == 2:
            experts, (out_features, in_features) = 1, param.shape
        else:
            raise UserError(f"target_parameters cannot adapt {parameter_name} of {param.ndim} dimensions",
                            "target 2-D or 3-D (fused expert) parameters")
        self.num_experts, self.in_features, self.out_features, self.r = int(experts), int(in_features), int(out_features), int(r)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        kw: dict[str, Any] = {"bias": False, "device": param.device, "dtype": dtype}
        self.lora_A = UninitLinear(self.in_features, self.r * self.num_experts, **kw)
        self.lora_B = UninitLinear(self.r * self.num_experts, self.out_features, **kw)
        self.merged = False
        if routed:
            from lorabench.methods.lora.experts_routed import check_routable

            check_routable(self.raw_module())
        if param.device.type != "meta":
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's init_lora_weights=True: A ~ kaiming_uniform(a=sqrt(5)), B = 0 (the model is unchanged)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def raw_module(self) -> nn.Module:
        """The module that owns the parameter (below any nested ParamLora)."""
        module = self.base_layer
        while isinstance(module, ParamLora):
            module = module.base_layer
        return module

    def parameter(self) -> torch.Tensor:
        return getattr(self.raw_module(), self.parameter_name)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs) with ``lhs @ rhs`` = the per-expert update B_e A_e in the parameter's layout."""
        e, r = self.num_experts, self.r
        a = self.lora_A.weight.reshape(e, r, self.in_features)
        b = self.lora_B.weight.reshape(self.out_features, r, e).permute(2, 0, 1)
        return (a.transpose(-2, -1), b.transpose(-2, -1)) if self.transposed else (b, a)

    def folded(self, weight: torch.Tensor) -> torch.Tensor:
        """W' = W + scaling * (the update), in W's dtype."""
        if self.num_experts == 1 and weight.ndim == 2:
            return weight + (self.lora_B.weight @ self.lora_A.weight * self.scaling).to(weight.dtype)
        lhs, rhs = self.factors()
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return torch.baddbmm(weight, lhs.to(weight.dtype), rhs.to(weight.dtype), alpha=self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """The update alone, in the adapter dtype, in the parameter's shape."""
        zero = torch.zeros_like(self.parameter(), dtype=self.lora_A.weight.dtype)
        return self.folded(zero)

    def merge(self) -> None:
        """``W += update`` in place (rounded to W's dtype); the forward then runs W as it is."""
        if not self.merged:
            with torch.no_grad():
                self.parameter().add_(self.delta_weight().to(self.parameter().dtype))
            self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the rounding of W's dtype)."""
        if self.merged:
            with torch.no_grad():
                self.parameter().sub_(self.delta_weight().to(self.parameter().dtype))
            self.merged = False

    def chain(self) -> dict[str, "ParamLora"]:
        """Every ParamLora down to the raw module, by parameter name (this one included)."""
        out: dict[str, ParamLora] = {}
        module: nn.Module = self
        while isinstance(module, ParamLora):
            out[module.parameter_name] = module
            module = module.base_layer
        return out

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            return self.base_layer(*args, **kwargs)
        raw = self.raw_module()
        if self.routed:  # the outermost wrapper runs the whole experts module (experts_routed.py)
            from lorabench.methods.lora.experts_routed import routed_experts_forward

            return routed_experts_forward(raw, self.chain(), *args, **kwargs)
        parametrize.register_parametrization(raw, self.parameter_name, _Fold(self), unsafe=True)
        try:
            with parametrize.cached():
                return self.base_layer(*args, **kwargs)
        finally:
            parametrize.remove_parametrizations(raw, self.parameter_name, leave_parametrized=False)

    def extra_repr(self) -> str:
        return f"parameter={self.parameter_name}, experts={self.num_experts}, r={self.r}, scaling={self.scaling:g}"


def wrap_raw(model: nn.Module, chosen: tuple[MatrixSpec, ...], cfg: Any, dtype: torch.dtype) -> None:
    """Wrap the ``chosen`` raw parameters of every decoder layer, nesting in the module's registration order;
    each with its rank and alpha from ``cfg`` (a LoraConfig: r / lora_alpha, or rank_pattern / alpha_pattern)."""
    by_module: dict[str, dict[str, MatrixSpec]] = {}  # module path in the layer -> parameter name -> matrix
    for m in chosen:
        module_path, _, name = m.parameter_path.rpartition(".")
        by_module.setdefault(module_path, {})[name] = m
    for layer_path, _ in layer_module_paths(model):
        for module_path, params in by_module.items():
            path = f"{layer_path}.{module_path}"
            module = model.get_submodule(path)
            for name in [n for n, _ in module.named_parameters(recurse=False) if n in params]:
                m = params[name]
                module = ParamLora(module, name, r=cfg.rank_for(m.parameter_path),
                                   lora_alpha=cfg.alpha_for(m.parameter_path), use_rslora=cfg.use_rslora,
                                   dtype=dtype, routed=cfg.routes(m))
            replace_module(model, path, module)


def raw_lora_modules(model: nn.Module) -> list[tuple[str, ParamLora]]:
    """(path, module) of every ParamLora, nested ones included (``...experts.base_layer``)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ParamLora)]
