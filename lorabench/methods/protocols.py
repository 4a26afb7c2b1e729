"""The typed seam between the core, a method and the runtime (torch-free).

A method is one :class:`~lorabench.methods.registry.Method` object registered in its folder's
``__init__``. It carries three things:

* its config dataclass (``config.py``, PEFT's names and defaults; CLI flags are generated from it);
* an :class:`Estimator` (``memory.py``): the torch-free terms the planner needs;
* a loader of its :class:`MethodRuntime` (``layer.py``, torch): ``apply`` turns a built transformers model
  into the trained one. The loader imports the module statically when called, so ``plan`` never imports torch.

:class:`LayerCtx` is what the planner hands an estimator's per-layer hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lorabench.specs import MatrixSpec, ModelSpec, TrainSpec

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from lorabench.memory.autograd import Graph, Sym
    from lorabench.methods.base import MethodConfig


@dataclass(frozen=True)
class LayerCtx:
    """What a layer program (and a method's per-layer hooks) needs to know besides the model shape."""

    model: ModelSpec
    train: TrainSpec
    method: Any  # the method config (each estimator narrows it to its own config class)
    hooks: "Estimator"
    tokens: int
    param_dtype: str
    train_base: bool

    @property
    def batch(self) -> int:
        return self.train.micro_batch_size

    @property
    def seq(self) -> int:
        return self.train.seq_len


@runtime_checkable
class Estimator(Protocol):
    """A method's torch-free estimator terms (its ``memory.py`` module satisfies this structurally)."""

    trains_base: bool
    """Whether the base model's own weights train (full fine-tuning): gradients flow into every layer."""

    def trainable_params(self, model: ModelSpec, cfg: Any) -> int:
        """Exact number of trainable elements (tested against the built model and PEFT)."""
        ...

    def trainable_dtype(self, cfg: Any, train: TrainSpec) -> str:
        """dtype of the trainable weights (and of their gradients and Adam states)."""
        ...

    def storage(self, model: ModelSpec, cfg: Any, train: TrainSpec) -> tuple[int, int]:
        """(frozen 16/32-bit weight bytes, quantized weight bytes)."""
        ...

    def quantized_params(self, model: ModelSpec, cfg: Any) -> int:
        """Elements of the base stored quantized (0 unless the method quantizes)."""
        ...

    def linear(self, g: "Graph", x: "Sym", m: MatrixSpec, ctx: LayerCtx) -> "Sym":
        """Symbolic forward of one projection of a decoder layer."""
        ...

    def after_sublayer(self, g: "Graph", x: "Sym", ctx: LayerCtx, where: str) -> "Sym":
        """Symbolic forward of what follows a sublayer (``where``: "attention" or "mlp")."""
        ...

    def adapted_weight(self, g: "Graph", m: MatrixSpec, ctx: LayerCtx) -> "Sym | None":
        """A raw parameter (router, fused expert tensor) as the layer's matmul uses it: None for the frozen
        parameter itself, else the symbolic folded weight the method's forward materializes (LoRA's
        ``target_parameters``); default :func:`lorabench.methods.terms.no_adapted_weight`."""
        ...

    def prefix_tokens(self, cfg: Any) -> int:
        """Virtual key/value positions prepended in every layer (prefix tuning), else 0."""
        ...

    def persistent_gradient_bytes(self, ctx: LayerCtx) -> int:
        """Activation-gradient bytes a layer's backward leaves alive until the end of backward."""
        ...

    def largest_trainable_params(self, model: ModelSpec, cfg: Any) -> int:
        """Elements of the largest trainable tensor (the optimizer step's per-tensor temporary)."""
        ...

    def root_trainable_params(self, model: ModelSpec, cfg: Any) -> int:
        """Trainable elements outside the decoder layers, in FSDP's root unit (default
        :func:`lorabench.methods.terms.no_root_params`: none)."""
        ...

    def trainable_tensor_numels(self, model: ModelSpec, cfg: Any) -> "list[int] | None":
        """Element counts of each trainable tensor, which ZeRO-1 partitions whole; None where the tensors
        are many and small enough to split evenly (default :func:`lorabench.methods.terms.even_tensor_numels`)."""
        ...


@runtime_checkable
class MethodRuntime(Protocol):
    """A method's runtime (its ``layer.py`` module). ``apply`` is required; ``materialize`` is optional:
    a method that must build the base itself on a real device (QLoRA quantizes each linear right after
    its init) defines ``materialize(meta_model, spec, cfg, train, *, device, seed)``."""

    def apply(self, model: "nn.Module", spec: ModelSpec, cfg: "MethodConfig", train: TrainSpec) -> "nn.Module":
        """Freeze/replace/wrap modules of ``model`` in place and return the model to train."""
        ...


@runtime_checkable
class StepTimeTerms(Protocol):
    """A method's torch-free step-time terms (its ``steptime.py`` module; :mod:`lorabench.steptime.model`)."""

    def adapter_work(self, model: ModelSpec, cfg: Any, train: TrainSpec) -> tuple[Any, Any]:
        """(forward, backward) :class:`~lorabench.steptime.work.Work` of the method's own ops, all layers."""
        ...

    def dequant_work(self, model: ModelSpec, cfg: Any, train: TrainSpec, device_kind: str = "gpu") -> Any:
        """Work of one dequantization of every quantized weight (zero Work for unquantized methods);
        ``device_kind`` (``gpu``/``cpu``) picks the kernel an ``auto`` setting resolves to."""
        ...

    def extra_dequant_work(self, model: ModelSpec, cfg: Any, train: TrainSpec, device_kind: str = "gpu") -> Any:
        """Dequantization Work each forward (and recomputed forward) does beyond :meth:`dequant_work` (DoRA's
        weight norm on a 4-bit base); default :func:`lorabench.methods.terms.no_extra_dequant`."""
        ...

    def fold_work(self, model: ModelSpec, cfg: Any, train: TrainSpec) -> tuple[Any, Any]:
        """(forward, backward) Work on adapted raw parameters (LoRA's ``target_parameters`` folds and the
        weight-gradient matmuls they add), run in the parameter dtype; default
        :func:`lorabench.methods.terms.no_fold_work`."""
        ...

    def trainable_tensors(self, model: ModelSpec, cfg: Any) -> int:
        """Number of trainable tensors (the optimizer's per-tensor cost)."""
        ...
