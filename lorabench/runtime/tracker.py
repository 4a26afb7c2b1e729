"""Live-storage memory tracker: a ``TorchDispatchMode`` that counts the bytes of every live tensor storage.

The same code measures real tensors (CPU runs in the sweep runner) and fake ones (the trace), so the two
agree number for number. Rules:

- A storage counts once, keyed by identity (``untyped_storage()._cdata``), with ``nbytes()`` bytes; views
  add nothing. It enters when an op under the mode returns it, or when the caller registers it
  (``track_model``, ``track_tensor``: parameters, buffers, inputs made before tracking). It leaves when its
  Python storage object dies (a ``weakref`` callback: torch keeps one Python object per live storage).
- Each storage has one category (:data:`TRACE_CATEGORIES`). Op outputs start as ``activations``
  (temporaries included) and are retagged when they turn out to be a ``p.grad`` (post-accumulate-grad hook,
  :meth:`MemoryTracker.track_grads`) or optimizer state (:meth:`MemoryTracker.track_optimizer_state`,
  re-scanned after each step: states are created lazily). A retagged storage that was alive at the peak
  moves in the peak breakdown too, so ``sum(peak_breakdown.values()) == peak_bytes`` with final categories.
- The peak is checked after every allocating op; ``peak_phase`` is the caller's phase (:data:`PHASES`).

Limits: tensor storage bytes (``torch.cuda.max_memory_allocated`` before its 512-byte rounding); kernel
workspaces that never surface as tensors are invisible.
"""

from __future__ import annotations

import contextlib
import fnmatch
import threading
import weakref
from typing import Any, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

from lorabench.memory.categories import PHASES, TRACE_CATEGORIES
from lorabench.runtime.storages import StorageInfo, is_quantized_module, local_tensor, quant_state_tensors, tensors_in

ACTIVATIONS = "activations"
_NO_STORAGE_OPS = frozenset({torch.ops.prim.device.default, torch.ops.aten.sym_size.default,
                             torch.ops.aten.sym_stride.default, torch.ops.aten.sym_numel.default,
                             torch.ops.aten.sym_storage_offset.default, torch.ops.aten._local_scalar_dense.default})
"""Ops that never return a tensor; skipped without looking at their output (the autograd engine asks a fake
tensor's device tens of thousands of times per step)."""


def _rows(live: dict[int, list[Any]], category: str | None) -> list[StorageInfo]:
    rows = [StorageInfo(e[3], e[4], e[5], e[0], e[1], e[6], e[7]) for e in live.values() if category in (None, e[1])]
    return sorted(rows, key=lambda row: -row.nbytes)


class MemoryTracker(TorchDispatchMode):
    """Counts live storage bytes by category and records the peak with its exact breakdown.

    Usage: ``tracker.track_model(model)``, ``tracker.track_tensor(input_ids)``, then under ``with tracker:``
    run the step inside ``tracker.phase("forward")`` etc. and call ``tracker.track_optimizer_state()`` after
    each optimizer step (:func:`lorabench.runtime.step.train_steps` does all of this).

    Attributes:
        quantized_patterns: fnmatch patterns of parameter/buffer names (``"*.absmax"``) that
            :meth:`track_model` files under ``quantized``; extend before calling it.
        current_bytes: bytes of all live tracked storages now.
        peak_bytes: the largest ``current_bytes`` seen since creation or :meth:`reset_peak`.
        peak_phase: the phase at that moment.
        peak_breakdown: category -> bytes at that moment (sums to ``peak_bytes``).
    """

    def __init__(self, quantized_patterns: Iterable[str] = ()) -> None:
        super().__init__()
        self.quantized_patterns: list[str] = list(quantized_patterns)
        self.current_bytes = 0
        self.peak_bytes = 0
        self.peak_phase = PHASES[0]
        self._phase = PHASES[0]
        self._totals: dict[str, int] = dict.fromkeys(TRACE_CATEGORIES, 0)
        self.peak_breakdown: dict[str, int] = dict(self._totals)
        # storage key -> [nbytes, category, birth sequence number, op, shape, dtype, module, phase]
        self._live: dict[int, list[Any]] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._seq = 0
        self._peak_seq = 0
        self._lock = threading.RLock()
        self._hooks: list[Any] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self._params: dict[int, torch.nn.Parameter] = {}
        self.context = ""
        """Label of the code running now (the module path, set by :meth:`label_modules`' hooks)."""
        self.phase_peak_bytes: dict[str, int] = dict.fromkeys(PHASES, 0)
        """Largest ``current_bytes`` seen while each phase was set."""
        self.timeline: list[tuple[str, int]] = []
        """(phase entered, ``current_bytes`` at that moment), one row per phase change."""
        self.keep_peak_storages = False
        """Snapshot the live storages at every new peak (for :meth:`peak_storages`; O(live) per peak)."""
        self._peak_live: dict[int, list[Any]] = {}

    # ------------------------------------------------------------------ phases
    @property
    def current_phase(self) -> str:
        return self._phase

    def set_phase(self, name: str) -> None:
        """Attribute what follows to phase ``name`` (one of :data:`PHASES`)."""
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; use one of {PHASES}")
        self._phase = name
        self.timeline.append((name, self.current_bytes))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Context manager form of :meth:`set_phase`; restores the previous phase on exit."""
        previous = self._phase
        self.set_phase(name)
        try:
            yield
        finally:
            self.set_phase(previous)

    # ------------------------------------------------------------------ registration
    def track_tensor(self, tensor: torch.Tensor, category: str = ACTIVATIONS, op: str = "input") -> None:
        """Count ``tensor``'s storage (if new) and file it under ``category`` (retagging it if known)."""
        if category not in self._totals:
            raise ValueError(f"unknown category {category!r}; use one of {TRACE_CATEGORIES}")
        self._follow(tensor, category, op, resized=False)

    def resync(self, tensor: torch.Tensor, category: str | None = None) -> None:
        """Follow a storage resized in place outside the dispatcher (``untyped_storage().resize_()``, which
        FSDP2 uses to free and re-allocate its all-gather buffers), optionally retagging it; a storage not
        seen before is counted under ``category`` (default activations)."""
        self._follow(tensor, category, "resize", resized=True)

    def track_model(self, model: torch.nn.Module) -> None:
        """Register every parameter and buffer of ``model``; hook trainable params to tag their grads.

        Idempotent: registering a model again adds no bytes and no second hook.

        Categories: ``quantized`` for buffers of quantized modules (:func:`is_quantized_module`), uint8
        tensors, the tensors of a bitsandbytes ``weight.quant_state`` (absmax, code, nested state) and names
        matching :attr:`quantized_patterns`; else ``weights_trainable`` for parameters with
        ``requires_grad``; else ``weights_frozen`` (frozen params, such as a 4-bit layer's 16-bit bias, and
        all other buffers).
        """
        for module_name, module in model.named_modules():
            quantized_module = is_quantized_module(module)
            prefix = f"{module_name}." if module_name else ""
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    quantized = quantized_module or self._is_quantized(prefix + name, buffer)
                    self.track_tensor(buffer, "quantized" if quantized else "weights_frozen", op=prefix + name)
            for name, param in module._parameters.items():
                if param is None:
                    continue
                for state_name, tensor in quant_state_tensors(param):
                    self.track_tensor(tensor, "quantized", op=f"{prefix}{name}.quant_state.{state_name}")
                if self._is_quantized(prefix + name, param):
                    category = "quantized"
                else:
                    category = "weights_trainable" if param.requires_grad else "weights_frozen"
                self.track_tensor(param, category, op=prefix + name)
                if category == "weights_trainable":
                    self._hook_grad(param)

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Remember ``optimizer``; its state tensors are tagged ``optimizer`` now and at every
        :meth:`track_optimizer_state` call (states are created lazily in the first step)."""
        if all(opt is not optimizer for opt in self._optimizers):
            self._optimizers.append(optimizer)
        self.track_optimizer_state()

    def track_optimizer_state(self) -> None:
        """Re-scan the state of every tracked optimizer and tag its tensors ``optimizer``."""
        for optimizer in self._optimizers:
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.layout == torch.strided:
                        self.track_tensor(value, "optimizer", op="optimizer.state")

    def track_grads(self) -> None:
        """Tag the ``.grad`` of every tracked trainable parameter as ``gradients`` (call after backward)."""
        for param in self._params.values():
            if param.grad is not None:
                self.track_tensor(param.grad, "gradients", op="grad")

    def label_modules(self, model: torch.nn.Module) -> None:
        """Record in :attr:`context` the path of the module whose forward is running (forward hooks;
        recomputation under gradient checkpointing is labeled too). Diagnostic; adds per-call overhead."""
        stack: list[str] = []

        def enter(name: str) -> Any:
            def hook(_module: torch.nn.Module, _args: Any) -> None:
                stack.append(self.context)
                self.context = name
            return hook

        def leave(_module: torch.nn.Module, _args: Any, _out: Any) -> None:
            self.context = stack.pop() if stack else ""

        for name, module in model.named_modules():
            self._hooks.append(module.register_forward_pre_hook(enter(name or "<model>")))
            self._hooks.append(module.register_forward_hook(leave))

    def close(self) -> None:
        """Stop following storages (drop weakrefs and grad hooks); counters keep their last values."""
        with self._lock:
            for handle in self._hooks:
                handle.remove()
            self._hooks.clear()
            self._refs.clear()
            self._params.clear()
            self._optimizers.clear()

    # ------------------------------------------------------------------ results
    def reset_peak(self) -> None:
        """Restart peak tracking (overall and per phase) from the current state."""
        with self._lock:
            self.phase_peak_bytes = dict.fromkeys(PHASES, 0)
            self.peak_bytes = -1
            self._update_peak()

    @property
    def breakdown(self) -> dict[str, int]:
        """Category -> bytes live now."""
        return dict(self._totals)

    def live_storages(self, category: str | None = None) -> list[StorageInfo]:
        """Every live storage (optionally of one category), largest first."""
        return _rows(self._live, category)

    def peak_storages(self, category: str | None = None) -> list[StorageInfo]:
        """The storages live at the peak moment, largest first (needs ``keep_peak_storages = True``).

        Categories are the final ones (a storage later retagged as a gradient shows as ``gradients``).
        """
        if not self.keep_peak_storages:
            raise RuntimeError("set tracker.keep_peak_storages = True before tracking to keep the peak's storages")
        return _rows(self._peak_live, category)

    def to_dict(self) -> dict[str, Any]:
        """The record's ``measured.tracker`` / ``traced`` shape: ``{"components", "peak_bytes", "phase"}``."""
        return {"components": dict(self.peak_breakdown), "peak_bytes": int(self.peak_bytes),
                "phase": self.peak_phase}

    # ------------------------------------------------------------------ dispatch
    def active(self) -> contextlib.AbstractContextManager[Any]:
        """Enter this mode unless it is already on the dispatch-mode stack (then a no-op context)."""
        if any(mode is self for mode in _get_current_dispatch_mode_stack()):
            return contextlib.nullcontext()
        return self

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _NO_STORAGE_OPS:
            return out
        with self._lock:
            grew = False
            for tensor in tensors_in(out):
                grew |= self._observe(tensor, func)
            if grew:
                self._update_peak()
        return out

    # ------------------------------------------------------------------ internals
    def _is_quantized(self, name: str, tensor: torch.Tensor) -> bool:
        return tensor.dtype == torch.uint8 or any(fnmatch.fnmatchcase(name, p) for p in self.quantized_patterns)

    def _hook_grad(self, param: torch.nn.Parameter) -> None:
        if id(param) in self._params:
            return
        self._params[id(param)] = param
        self._hooks.append(param.register_post_accumulate_grad_hook(
            lambda p: self.track_tensor(p.grad, "gradients", op="grad")))

    def _observe(self, tensor: torch.Tensor, func: Any) -> bool:
        """Count a new storage (True) or follow a resize of a known one (True if it grew). Meta tensors hold no
        memory (a model built on meta, then materialized, allocates only when materialized): never counted."""
        if tensor.device.type == "meta":
            return False
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self._live.get(key)
        if entry is None:
            self._add(storage, key, ACTIVATIONS, func.overloadpacket.__name__, tensor)
            return True
        return self._resize(entry, storage.nbytes())

    def _follow(self, tensor: torch.Tensor, category: str | None, op: str, resized: bool) -> None:
        tensor = local_tensor(tensor)
        with self._lock:
            storage = tensor.untyped_storage()
            key = storage._cdata
            entry = self._live.get(key)
            if entry is None:
                self._add(storage, key, category or ACTIVATIONS, op, tensor)
                self._update_peak()
                return
            if category is not None and entry[1] != category:
                self._retag(entry, category)
            if resized and self._resize(entry, storage.nbytes()):
                self._update_peak()

    def _resize(self, entry: list[Any], nbytes: int) -> bool:
        """Update a known storage's size; True if it grew."""
        delta = nbytes - entry[0]
        if delta:
            entry[0] = nbytes
            self.current_bytes += delta
            self._totals[entry[1]] += delta
        return delta > 0

    def _add(self, storage: torch.UntypedStorage, key: int, category: str, op: str, tensor: torch.Tensor) -> None:
        nbytes = storage.nbytes()
        self._seq += 1
        self._live[key] = [nbytes, category, self._seq, op, tuple(tensor.shape), tensor.dtype, self.context,
                           self._phase]
        self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._free(key))
        self.current_bytes += nbytes
        self._totals[category] += nbytes

    def _free(self, key: int) -> None:
        with self._lock:
            entry = self._live.pop(key, None)
            self._refs.pop(key, None)
            if entry is not None:
                self.current_bytes -= entry[0]
                self._totals[entry[1]] -= entry[0]

    def _retag(self, entry: list[Any], category: str) -> None:
        nbytes, old = entry[0], entry[1]
        self._totals[old] -= nbytes
        self._totals[category] += nbytes
        entry[1] = category
        # Alive now and born no later than the peak moment: it was alive at the peak, in its old category.
        if entry[2] <= self._peak_seq:
            self.peak_breakdown[old] -= nbytes
            self.peak_breakdown[category] += nbytes

    def _update_peak(self) -> None:
        current = self.current_bytes
        if current > self.phase_peak_bytes[self._phase]:
            self.phase_peak_bytes[self._phase] = current
        if current > self.peak_bytes:
            self.peak_bytes = current
            self.peak_breakdown = dict(self._totals)
            self.peak_phase = self._phase
            self._peak_seq = self._seq
            if self.keep_peak_storages:
                self._peak_live = dict(self._live)
