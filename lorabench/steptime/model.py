"""Predicted step time: a roofline per op class, summed (torch-free).

For each op class c (:data:`lorabench.steptime.work.OP_CLASSES`) the work of one optimizer step (FLOPs,
bytes, kernels; :mod:`lorabench.steptime.terms` for the base model, each method's ``steptime.py`` for its own
ops) is timed as

    t_c = max(flops_c / peak, bytes_c / bandwidth) / eff_c + kernels_c * kernel_overhead_s

and the step time is the sum. ``recompute`` (gradient checkpointing) repeats every decoder layer's forward,
each piece at the efficiency of its own class; with QLoRA it dequantizes once more. Ops of a forward
(also recomputed ones) cost ``forward_op_overhead_s`` on top: eager PyTorch runs them from Python module code,
while backward ops run from the autograd engine. The efficiencies come from
conf/calibration/time-<device>.yaml (:mod:`lorabench.steptime.calibration`). One step = ``grad_accum_steps``
micro-batches + one optimizer step + the data-parallel communication.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from lorabench.methods import get
from lorabench.methods.base import MethodConfig
from lorabench.specs import DTYPE_BYTES, GpuSpec, ModelSpec, TrainSpec
from lorabench.steptime import calibration as cal_mod
from lorabench.steptime import comm, terms
from lorabench.steptime.flops import training_flops_per_token
from lorabench.steptime.work import OP_CLASSES, Work


def time_hooks(method: str) -> Any:
    """The registered method's torch-free step-time terms (its folder's ``steptime`` module)."""
    hooks = get(method).step_time
    if hooks is None:
        raise ValueError(f"method {method!r} registers no step-time terms")
    return hooks


def estimator(method: str) -> Any:
    return get(method).estimator


@dataclass(frozen=True)
class Piece:
    """Work of one op class on one roofline (its peak FLOP/s and bandwidth)."""

    cls: str
    work: Work
    peak_flops_per_s: float
    bytes_per_s: float
    report_as: str = ""
    forward: bool = False
    """Ops of a module's forward (also when recomputed): on the CPU they carry Python module overhead."""

    def unit_time_s(self) -> float:
        """Roofline time at efficiency 1, without kernel overheads."""
        return max(self.work.flops / self.peak_flops_per_s, self.work.bytes / self.bytes_per_s)


@dataclass(frozen=True)
class StepTime:
    """One optimizer step's predicted time on one GPU, by op class."""

    components_s: dict[str, float]
    step_time_s: float
    tokens_per_step: int
    model_flops_per_token: float
    peak_flops_per_s: float
    pieces: tuple[Piece, ...] = field(default=(), repr=False)

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second over all data-parallel GPUs."""
        return self.tokens_per_step / self.step_time_s

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation per GPU (PaLM, Chowdhery et al. 2022, App. B)."""
        per_gpu = self.tokens_per_s / max(1, self.gpus)
        return self.model_flops_per_token * per_gpu / self.peak_flops_per_s

    gpus: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
                "time_components_s": dict(self.components_s), "model_flops_per_token": self.model_flops_per_token}


def _layer_forward(model: ModelSpec, train: TrainSpec) -> Work:
    """The decoder layers' share of the dense forward (no head): what checkpointing recomputes, plus the
    checkpoint machinery's own ops per layer."""
    head = model.vocab_size * model.hidden_size
    fwd = terms.dense_forward(model, train)
    t, e = train.tokens_per_step, DTYPE_BYTES[train.compute_dtype]
    return Work(fwd.flops - 2.0 * t * head, fwd.bytes - head * e - t * (model.hidden_size + model.vocab_size) * e,
                fwd.kernels - terms.OPS_PER_LINEAR + terms.CHECKPOINT_OPS_PER_LAYER * model.num_layers)


def pieces(model: ModelSpec, method: MethodConfig, train: TrainSpec, device: GpuSpec) -> list[Piece]:
    """Every op class's work for one optimizer step, on its roofline."""
    est, hooks = estimator(method.name), time_hooks(method.name)
    base = bool(est.trains_base)
    peak = device.peak_flops_per_s(train.compute_dtype)
    t_dtype = est.trainable_dtype(method, train)
    bw = device.memory_bandwidth_bytes_per_s
    acc = train.grad_accum_steps
    prefix = est.prefix_tokens(method)
    attn_f, attn_b = terms.attention(model, train, prefix)
    elem_f, elem_b = terms.layer_elementwise(model, train)
    loss_f, loss_b = terms.head_and_loss(model, train, base)
    ad_f, ad_b = hooks.adapter_work(model, method, train)
    fold_f, fold_b = hooks.fold_work(model, method, train)
    deq = hooks.dequant_work(model, method, train, device_kind=device.kind)
    deq_f = deq + hooks.extra_dequant_work(model, method, train, device_kind=device.kind)
    a_peak = device.peak_flops_per_s(t_dtype)
    micro = [
        Piece("matmul_forward", terms.dense_forward(model, train), peak, bw, forward=True),
        Piece("matmul_input_grad", terms.dense_input_grad(model, train, base), peak, bw),
        Piece("matmul_weight_grad", terms.dense_weight_grad(model, train, base), peak, bw),
        Piece("attention", attn_f, peak, bw, forward=True), Piece("attention", attn_b, peak, bw),
        Piece("adapter", ad_f, a_peak, bw, forward=True), Piece("adapter", ad_b, a_peak, bw),
        Piece("adapter", fold_f, peak, bw, forward=True), Piece("adapter", fold_b, peak, bw),
        Piece("dequant", deq_f, peak, bw, forward=True), Piece("dequant", deq, peak, bw),
        Piece("elementwise", elem_f, peak, bw, forward=True), Piece("elementwise", elem_b, peak, bw),
        Piece("loss", loss_f, peak, bw, forward=True), Piece("loss", loss_b, peak, bw),
    ]
    if train.gradient_checkpointing:  # the layers' forward once more, inside backward
        micro += [Piece("matmul_forward", _layer_forward(model, train), peak, bw, "recompute", True),
                  Piece("attention", attn_f, peak, bw, "recompute", True),
                  Piece("adapter", ad_f, a_peak, bw, "recompute", True),
                  Piece("adapter", fold_f, peak, bw, "recompute", True),
                  Piece("dequant", deq_f, peak, bw, "recompute", True),
                  Piece("elementwise", elem_f, peak, bw, "recompute", True)]
    out = [replace(p, work=p.work * acc) for p in micro]
    n_train = est.trainable_params(model, method)
    t_bytes = DTYPE_BYTES[t_dtype]
    shard = train.num_gpus if train.sharding != "none" else 1
    opt = terms.optimizer_step(train.optimizer, n_train // shard, hooks.trainable_tensors(model, method), t_bytes,
                               per_tensor_loop=device.kind == "cpu", impl=train.adamw_impl)
    if acc > 1:  # gradient accumulation: grad += new grad for every micro-batch after the first
        opt = opt + Work(0.0, (acc - 1) * 3 * n_train * t_bytes, (acc - 1) * hooks.trainable_tensors(model, method))
    out.append(Piece("optimizer", opt, peak, bw))
    weights, quantized = est.storage(model, method, train)
    c_work, link = comm.communication(train, device, n_train * t_bytes, weights + quantized + n_train * t_bytes)
    out.append(Piece("communication", c_work, peak, link))
    return out


def predict_time(model: ModelSpec, method: MethodConfig, train: TrainSpec, device: GpuSpec,
                 calibration: cal_mod.TimeCalibration | None = None) -> StepTime:
    """Predicted time of one optimizer step of ``train`` on ``device`` (per GPU; all GPUs step together)."""
    cal = calibration or cal_mod.load(device.name)
    # the per-op cost: an explicit or fitted calibration, else the device's own measurement, else the default
    explicit = calibration is not None or cal_mod.is_fitted(device.name)
    overhead = cal.kernel_overhead_s if explicit or not device.kernel_overhead_s else device.kernel_overhead_s
    parts = pieces(model, method, train, device)
    comps = {c: 0.0 for c in OP_CLASSES}
    for p in parts:
        per_op = overhead + (cal.forward_op_overhead_s if p.forward else 0.0)
        comps[p.report_as or p.cls] += p.unit_time_s() / cal.efficiency[p.cls] + p.work.kernels * per_op
    est = estimator(method.name)
    attended = train.seq_len + est.prefix_tokens(method)
    flops = training_flops_per_token(model, bool(est.trains_base), est.trainable_params(model, method), attended)
    tokens = train.tokens_per_step * train.grad_accum_steps * train.num_gpus
    return StepTime(comps, sum(comps.values()), tokens, flops, device.peak_flops_per_s(train.compute_dtype),
                    tuple(parts), gpus=train.num_gpus)
