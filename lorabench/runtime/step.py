"""The one definition of a training step, shared by the trace (fake tensors) and the runner (real tensors).

A step is what the Hugging Face Trainer does per optimizer step with ``grad_accum_steps=1``:
``loss = model(input_ids, labels=input_ids).loss`` (the model shifts labels and computes the fp32
cross-entropy itself), ``loss.backward()``, ``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``.
The model output (which holds the logits) is dropped before backward, as the Trainer's ``compute_loss``
returns only the loss. Mixed precision wraps the forward in ``torch.autocast`` only (backward runs
outside, as torch recommends).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterable

import torch
from torch._subclasses.fake_tensor import is_fake

from lorabench.errors import UserError
from lorabench.runtime.tracker import MemoryTracker
from lorabench.specs import OptimizerSpec, TrainSpec

AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
"""TrainSpec.precision -> autocast dtype (other precisions run without autocast)."""

BNB_OPTIMIZERS: dict[str, str] = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw": "PagedAdamW",
    "paged_adamw_8bit": "PagedAdamW8bit",
}
"""lorabench optimizer name -> bitsandbytes.optim class name."""


def autocast_dtype_for(precision: "str | TrainSpec") -> torch.dtype | None:
    """The autocast dtype of a TrainSpec (its ``autocast_dtype``) or of a ``precision`` name (None: no autocast)."""
    if isinstance(precision, str):
        return AUTOCAST_DTYPES.get(precision)
    name = precision.autocast_dtype
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name] if name else None


def synthetic_batch(vocab_size: int, micro_batch_size: int, seq_len: int, device: str | torch.device = "cpu",
                    seed: int = 0) -> torch.Tensor:
    """Uniform random token ids of shape (micro_batch_size, seq_len), int64, reproducible from ``seed``.

    Call it outside ``FakeTensorMode`` (it draws from a real generator); the trace then converts the ids with
    ``fake_mode.from_tensor``. One sequence per row, no padding: the mask-free causal attention path.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab_size, (micro_batch_size, seq_len), generator=generator, dtype=torch.long)
    return ids if torch.device(device).type == "cpu" else ids.to(device)


def make_optimizer(params: Iterable[torch.nn.Parameter], optimizer_spec: OptimizerSpec | str, lr: float = 1e-4,
                   foreach: bool | None = None, impl: str | None = None) -> torch.optim.Optimizer:
    """Build the optimizer named by ``optimizer_spec``.

    Args:
        params: the trainable parameters.
        optimizer_spec: ``adamw`` (torch AdamW, weight decay 0.01), ``sgd``, ``sgd_momentum`` (momentum 0.9),
            ``adamw_8bit``, ``paged_adamw``, ``paged_adamw_8bit`` (bitsandbytes, imported lazily; its CPU
            backend runs them too). bitsandbytes 0.50 keeps 8-bit states in blocks of 256 (1 + 4/256 bytes
            per element), fp32 states for tensors under ``min_8bit_size`` = 4096 elements, and two shared
            256-entry fp32 quantization maps.
        lr: learning rate.
        foreach: torch optimizers only; None keeps torch's default, which is the multi-tensor (foreach)
            implementation on CUDA and the per-parameter loop on CPU. The foreach AdamW allocates one
            temporary the size of all states of a dtype (``exp_avg_sq.sqrt()``) at once; the loop only one
            parameter's worth. The trace passes True to reproduce a CUDA run.
        impl: ``TrainSpec.adamw_impl`` (torch optimizers only), overriding ``foreach``: ``foreach``
            (``foreach=True``), ``fused`` (``fused=True``) or ``for-loop`` (``foreach=False``).

    Raises:
        UserError: unknown optimizer, or a bitsandbytes optimizer that cannot be imported.
    """
    name = optimizer_spec.name if isinstance(optimizer_spec, OptimizerSpec) else str(optimizer_spec)
    params = [p for p in params if p.requires_grad]
    kwargs: dict[str, Any] = {"foreach": foreach}
    if impl is not None:
        kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, **kwargs)
    if name in ("sgd", "sgd_momentum"):
        return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "sgd_momentum" else 0.0, **kwargs)
    if name in BNB_OPTIMIZERS:
        return _bnb_optimizer(name, params, lr)
    raise UserError(f"unknown optimizer {name!r}",
                    "use adamw, adamw_8bit, paged_adamw, paged_adamw_8bit, sgd or sgd_momentum")


def _bnb_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.optim as bnb_optim
    except Exception as err:  # ImportError, or a backend that fails to initialize
        raise UserError(f"optimizer {name!r} needs bitsandbytes, which failed to import ({type(err).__name__})",
                        "pip install bitsandbytes>=0.47, or use --optimizer adamw") from None
    return getattr(bnb_optim, BNB_OPTIMIZERS[name])(params, lr=lr)


def train_steps(model: torch.nn.Module, batch: torch.Tensor, optimizer: torch.optim.Optimizer, n_steps: int,
                tracker: MemoryTracker | None = None, autocast_dtype: torch.dtype | None = None,
                warm_start: bool = False, loss: str = "hf") -> list[float]:
    """Run ``n_steps`` training steps on one micro-batch and return the losses.

    With a ``tracker``, the model (parameters, buffers), the batch and the optimizer are registered on it
    (idempotent) and the steps run under it as a dispatch mode (entered here unless the caller already
    did). Phases: forward, backward, optimizer. After backward the tracker re-tags ``p.grad`` as gradients;
    after the optimizer step it re-scans optimizer state (created lazily in the first step).

    Args:
        model: a causal LM returning ``.loss`` when given ``labels``.
        batch: token ids (b, s); also the labels (the model shifts them).
        optimizer: built by :func:`make_optimizer`.
        n_steps: number of optimizer steps.
        tracker: optional live-storage tracker.
        autocast_dtype: bf16/fp16 for mixed precision (forward under ``torch.autocast``), None otherwise.
        warm_start: make the first step optimizer-only: zero gradients (allocated in the backward phase) and
            ``optimizer.step()``, which creates the optimizer state exactly as a full first step does. The
            first step's forward and backward run without optimizer state, so every moment of them has a
            subset of the live bytes of the same moment in step 2: a memory trace of ``n_steps >= 2`` has the
            same peak, breakdown and phase either way, in about half the time. Ignored for one step.
            Not for timing runs.
        loss: ``TrainSpec.loss``: ``hf`` (the model's own loss) or ``chunked``
            (:func:`lorabench.runtime.loss.install_chunked_loss` around the steps).

    Returns:
        The loss of each full step (NaN for fake tensors, whose values do not exist).
    """
    warm_start = warm_start and n_steps >= 2
    if loss == "chunked":
        from lorabench.runtime.loss import install_chunked_loss

        with install_chunked_loss(model):
            return train_steps(model, batch, optimizer, n_steps, tracker, autocast_dtype, warm_start)
    if tracker is None:
        return _run_steps(model, batch, optimizer, n_steps, None, autocast_dtype, warm_start)
    tracker.track_model(model)
    tracker.track_tensor(batch, "activations", op="input_ids")
    tracker.track_optimizer(optimizer)
    with tracker.active():
        return _run_steps(model, batch, optimizer, n_steps, tracker, autocast_dtype, warm_start)


def _run_steps(model: torch.nn.Module, batch: torch.Tensor, optimizer: torch.optim.Optimizer, n_steps: int,
               tracker: MemoryTracker | None, autocast_dtype: torch.dtype | None, warm_start: bool) -> list[float]:
    device_type = batch.device.type
    phase = tracker.phase if tracker is not None else (lambda _name: contextlib.nullcontext())
    losses: list[float] = []
    for step in range(n_steps):
        if warm_start and step == 0:
            with phase("backward"):
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        param.grad = torch.zeros_like(param)
                if tracker is not None:
                    tracker.track_grads()
            _optimizer_step(optimizer, phase, tracker)
            continue
        with phase("forward"):
            autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                        else contextlib.nullcontext())
            with autocast:
                loss = _forward_loss(model, batch)
        with phase("backward"):
            loss.backward()
            if tracker is not None:
                tracker.track_grads()
        losses.append(math.nan if is_fake(loss) else float(loss.detach()))
        del loss
        _optimizer_step(optimizer, phase, tracker)
    return losses


def _optimizer_step(optimizer: torch.optim.Optimizer, phase: Any, tracker: MemoryTracker | None) -> None:
    with phase("optimizer"):
        optimizer.step()
        if tracker is not None:
            tracker.track_optimizer_state()
        optimizer.zero_grad(set_to_none=True)


def _forward_loss(model: torch.nn.Module, batch: torch.Tensor) -> Any:
    """Forward pass returning only the loss (the output object, which holds the logits, is dropped)."""
    output = model(input_ids=batch, labels=batch)
    return output.loss
