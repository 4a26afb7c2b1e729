"""Exact tensor-memory peak of a full-size training step without a GPU: a fake-tensor trace.

The model is built on the meta device with the method applied (``runtime.build.prepare_model``), every
parameter, buffer and tensor attribute is swapped for a *fake* CPU tensor (shape, dtype, strides and
storage identity, no memory), and :func:`lorabench.runtime.step.train_steps` runs two steps (the second
has optimizer state) under ``FakeTensorMode`` with a :class:`~lorabench.runtime.tracker.MemoryTracker` on
top. Every op runs its real shape logic and CPU kernel choice, so the peak is the one a real CPU run has,
byte for byte (``trace(..., fake=False)`` runs the same steps on real tensors; tests check they agree), in
seconds for a 7B model and allocating no tensor memory.

Conventions of the traced step: batch of uniform random ids (one sequence per row, no padding, labels =
inputs), model in train mode, learning rate :data:`TRACE_LR`, the optimizer's multi-tensor (foreach)
implementation, which is torch's default on CUDA.

Why the CPU device (see :data:`DEVICE_NOTE`): fake CUDA tensors abort on a CPU-only torch, and the plain
meta device overestimates (sdpa falls back to its math path, materializing b*heads*s^2 scores).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lorabench.errors import UserError, require
from lorabench.methods.base import MethodConfig
from lorabench.runtime.bnb_stack import matmul_4bit_as_on_cuda
from lorabench.runtime.step import autocast_dtype_for, make_optimizer, synthetic_batch, train_steps
from lorabench.runtime.trace_patches import (cuda_dropout, dequant_as_on_cuda, nf4_for_tracing, quiet_fake_tensor_log,
                                           unpacked_batches_under_fake)
from lorabench.runtime.storages import StorageInfo
from lorabench.runtime.tracker import MemoryTracker
from lorabench.specs import ModelSpec, TrainSpec

DEVICE_NOTE = (
    "traced on the CPU device: sdpa runs _scaled_dot_product_flash_attention_for_cpu, which saves the output "
    "and an fp32 logsumexp of (b, heads, s) for backward, no s^2 buffer; CUDA's flash/mem-efficient kernels "
    "save the same, plus a philox seed/offset pair (a few bytes) and, for mem-efficient, a logsumexp padded "
    "to a multiple of 32 queries; their backward workspaces (e.g. flash's fp32 dq accumulator) are not "
    "tensors the trace sees; eager attention materializes the s^2 probabilities on both devices. "
    "Bytes are tensor storage bytes before the CUDA allocator's 512-byte rounding."
)
"""The device caveat attached to every trace result (also in docs)."""

REAL_NOTE = "real CPU tensors: the same steps as the trace, allocating every byte"

TRACE_LR = 1e-4
"""Learning rate of the traced optimizer (values never matter under fake tensors)."""


@dataclass(frozen=True)
class TraceResult:
    """Peak of a traced training step.

    Attributes:
        components: TRACE_CATEGORIES -> bytes live at the peak (sums to ``peak_bytes``).
        peak_bytes: largest live tensor bytes over the traced steps.
        phase: phase of the peak (forward, backward, optimizer, setup).
        seconds: wall time of the trace (build + steps).
        phase_peak_bytes: largest live bytes within each phase.
        note: the device caveat (:data:`DEVICE_NOTE`).
        peak_storages: with ``keep_storages=True``, every storage live at the peak, largest first.
    """

    components: dict[str, int]
    peak_bytes: int
    phase: str
    seconds: float
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)
    note: str = DEVICE_NOTE
    peak_storages: tuple[StorageInfo, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The run record's ``traced`` object: ``{"components", "peak_bytes", "phase", "seconds"}``."""
        return {"components": dict(self.components), "peak_bytes": self.peak_bytes, "phase": self.phase,
                "seconds": round(self.seconds, 3)}


def trace(spec: ModelSpec, method_cfg: MethodConfig, train: TrainSpec, *, steps: int = 2,
          fake: bool = True, warm_start: bool = True, keep_storages: bool = False,
          as_on_cuda: bool = True, stack: str = "lorabench") -> TraceResult:
    """Trace ``steps`` training steps of the full-size model under fake tensors and return the peak.

    Args:
        spec, method_cfg, train: what to trace (one process: ``num_gpus`` 1, no sharding).
        steps: training steps; the second is the first with optimizer state, so keep >= 2.
        fake: False runs the same steps on real CPU tensors (small models only; for cross-checks).
        warm_start: the first step is optimizer-only (zero gradients create the optimizer state): the same
            peak as full steps in half the time (see ``train_steps``); False runs every step in full.
        as_on_cuda: take the kernels a CUDA run takes where they differ (``dequant=auto``: the Triton NF4
            op); False traces what a CPU run does (the runner's CPU jobs, ``trace=true``).
        keep_storages: also return the storages live at the peak, labeled with the module that made them
            (a diagnostic: adds module hooks and a snapshot at every new peak, ~10-20% slower).
        stack: ``lorabench`` (its own method modules) or ``peft`` (PEFT's, :mod:`lorabench.runtime.peft_stack`).

    Raises:
        UserError: a sharded/multi-GPU set-up, or a model or method the tracer cannot build or run.
    """
    require(train.num_gpus == 1 and train.sharding == "none",
            "the tracer runs one unsharded process (--gpus/--sharding are not traced)",
            "drop --gpus/--sharding, or use `lorabench plan` for sharded set-ups")
    require(not spec.has_fused_experts or train.param_dtype == "bf16",
            f"the tracer runs {spec.name}'s fused experts through torch's grouped matmul, which takes bf16 "
            f"only (these weights are {train.param_dtype}{', cast by prepare_kbit' if train.prepare_kbit else ''})",
            "use `lorabench plan` for this configuration, or trace it with bf16 weights")
    start = time.perf_counter()
    tracker = _run_tracked(spec, method_cfg, train, steps, fake=fake, warm_start=warm_start,
                           configure=_keep_storages if keep_storages else None, as_on_cuda=as_on_cuda, stack=stack)
    return TraceResult(components=dict(tracker.peak_breakdown), peak_bytes=tracker.peak_bytes,
                       phase=tracker.peak_phase, seconds=time.perf_counter() - start,
                       phase_peak_bytes=dict(tracker.phase_peak_bytes), note=DEVICE_NOTE if fake else REAL_NOTE,
                       peak_storages=tuple(tracker.peak_storages()) if keep_storages else ())


def _keep_storages(tracker: MemoryTracker, model: torch.nn.Module) -> None:
    tracker.keep_peak_storages = True
    tracker.label_modules(model)


def peak_tensors(spec: ModelSpec, method_cfg: MethodConfig, train: TrainSpec, *, steps: int = 2,
                 category: str | None = "activations") -> list[StorageInfo]:
    """The storages live at the peak of a trace, largest first (diagnostic for deriving formulas).

    Each row is a :class:`StorageInfo` ``(op, shape, dtype, nbytes, category, module, phase)``: the aten op
    that produced it, the first tensor's shape/dtype, its bytes, its final category, the module whose
    forward was running (also during recomputation) and the phase it was made in. ``category=None``
    returns all categories.
    """
    result = trace(spec, method_cfg, train, steps=steps, keep_storages=True)
    return [row for row in result.peak_storages if category in (None, row.category)]


def trace_layer_activations(spec: ModelSpec, method_cfg: MethodConfig, train: TrainSpec) -> dict[str, int]:
    """Activation bytes live at the peak, summed by the module that made them (see :func:`by_module`)."""
    return by_module(peak_tensors(spec, method_cfg, train))


def by_module(rows: Iterable[StorageInfo]) -> dict[str, int]:
    """Bytes summed by the module that made each storage, largest first.

    Decoder-layer indices are folded (``model.layers.*.mlp.up_proj``), so each entry sums over all layers;
    storages made outside any module forward are keyed by their phase (``(backward)``, ``(optimizer)``).
    """
    totals: dict[str, int] = {}
    for row in rows:
        key = _fold_layer_index(row.module) if row.module else f"({row.phase})"
        totals[key] = totals.get(key, 0) + row.nbytes
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def _fold_layer_index(module: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in module.split("."))


def _run_tracked(spec: ModelSpec, method_cfg: MethodConfig, train: TrainSpec, steps: int, *, fake: bool,
                 warm_start: bool = True,
                 configure: Callable[[MemoryTracker, torch.nn.Module], None] | None = None,
                 as_on_cuda: bool = True, stack: str = "lorabench") -> MemoryTracker:
    """Build the model (fake or real CPU), then run ``steps`` tracked training steps; returns the tracker."""
    # Real inputs are allowed (and faked per op): bitsandbytes' 8-bit optimizers keep their shared quantization
    # maps as real CPU tensors built in the constructor, which cannot run under fake mode (it reads values).
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    model = _build(spec, method_cfg, train, fake_mode, stack)
    model.train()
    batch = synthetic_batch(spec.vocab_size, train.micro_batch_size, train.seq_len)
    if fake_mode is not None:
        batch = fake_mode.from_tensor(batch)
    tracker = MemoryTracker()
    if configure is not None:
        configure(tracker, model)
    try:
        # Built outside fake mode: bitsandbytes' constructors compute their quantization maps from values.
        optimizer = make_optimizer(model.parameters(), train.optimizer, TRACE_LR, impl=train.adamw_impl)
        with contextlib.ExitStack() as stack:
            if as_on_cuda:
                stack.enter_context(dequant_as_on_cuda())
            if fake_mode is not None:
                stack.enter_context(quiet_fake_tensor_log())
                stack.enter_context(fake_mode)
                stack.enter_context(unpacked_batches_under_fake())
                stack.enter_context(nf4_for_tracing())
                stack.enter_context(cuda_dropout())
                stack.enter_context(matmul_4bit_as_on_cuda())
            train_steps(model, batch, optimizer, steps, tracker=tracker, loss=train.loss,
                        autocast_dtype=autocast_dtype_for(train), warm_start=warm_start)
    except UserError:
        raise
    except Exception as err:  # an op without a fake kernel, a data-dependent branch, ...
        raise UserError(f"the tracer cannot run {spec.name} with {method_cfg.name}: {type(err).__name__}: "
                        f"{_first_line(err)}", "use `lorabench plan` for this configuration") from err
    finally:
        tracker.close()
    return tracker


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


# ---------------------------------------------------------------------------- building the model
def _build(spec: ModelSpec, method_cfg: MethodConfig, train: TrainSpec,
           fake_mode: FakeTensorMode | None, stack: str = "lorabench") -> torch.nn.Module:
    """The model with the method applied (by lorabench's modules, or PEFT's for ``stack="peft"``): on meta,
    then every tensor a fake CPU tensor of ``fake_mode``; or on the real CPU device when ``fake_mode`` is None."""
    from lorabench.runtime.build import prepare_model
    from lorabench.runtime.peft_stack import build_peft_model

    builder = build_peft_model if stack == "peft" else prepare_model
    try:
        model = builder(spec, method_cfg, train, device="meta" if fake_mode is not None else "cpu")
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"cannot build {spec.name} with {method_cfg.name}: {type(err).__name__}: "
                        f"{_first_line(err)}", "use `lorabench plan` for this configuration") from err
    if fake_mode is not None:
        from lorabench.runtime.bnb_stack import quant_states, reattach_quant_states

        states = quant_states(model)  # bitsandbytes' QuantState tensors live beside the weights, not in them
        to_fake(model, fake_mode)
        reattach_quant_states(states, lambda t: fake_mode.fake_tensor_converter.from_meta_and_device(
            fake_mode, t if t.device.type == "meta" else t.detach().to("meta"), "cpu"))
    return model


def to_fake(model: torch.nn.Module, fake_mode: FakeTensorMode, device: str = "cpu") -> None:
    """Swap every parameter, buffer and public tensor attribute of ``model`` for a fake tensor on ``device``.

    Parameter-ness and ``requires_grad`` are kept; a tensor shared by several modules (tied embeddings)
    maps to one fake tensor. Works from meta (or real) tensors and never calls ``.to()`` inside fake mode
    (which fails on modules).
    """
    memo: dict[int, torch.Tensor] = {}

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in memo:
            meta = tensor.detach() if tensor.device.type == "meta" else tensor.detach().to("meta")
            fake = fake_mode.fake_tensor_converter.from_meta_and_device(fake_mode, meta, device)
            if isinstance(tensor, torch.nn.Parameter):
                fake = torch.nn.Parameter(fake, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = fake
        return memo[id(tensor)]

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = convert(param)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = convert(buffer)
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not name.startswith("_"):
                setattr(module, name, convert(value))
