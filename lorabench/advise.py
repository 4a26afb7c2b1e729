"""``advise``: search the knob space for configurations that fit, rank them by time (or cost), and keep the
Pareto set of memory vs time (torch-free; the planner and the step-time model, no runs).

Knobs searched: the method and its main knobs (LoRA/QLoRA rank and targets, QLoRA's 4-bit backend),
gradient checkpointing, micro-batch x gradient accumulation at a fixed global batch, the optimizer (AdamW,
8-bit, paged 8-bit), the adapter dtype (fp32 as PEFT upcasts, or bf16), over several GPUs the ZeRO stage, and
every recipe (conf/recipe/*.yaml) that selects a method, with the knobs its stack sets.
Memory grows with the micro-batch, so each combination is walked by increasing micro-batch and stops at the
first that does not fit (it becomes a "nearest non-fitting" candidate).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

from lorabench.errors import require
from lorabench.memory.planner import Prediction, fits, predict
from lorabench.methods import get as get_method, make_config
from lorabench.methods.base import MethodConfig
from lorabench.specs import GpuSpec, ModelSpec, OptimizerSpec, TrainSpec
from lorabench.steptime.model import StepTime, predict_time

#: (method, knobs) variants searched, in the order ties are broken.
METHOD_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("lora", {}), ("lora", {"r": 16, "target_modules": "all-linear"}), ("lora", {"r": 64, "target_modules": "all-linear"}),
    ("qlora", {"r": 16}), ("qlora", {"r": 64}), ("qlora", {"r": 16, "backend": "bitsandbytes"}),
    ("full", {}), ("prefix", {}), ("adapters", {}), ("ia3", {}),
)
#: Extra variants for models with fused MoE experts: LoRA on the experts too (``target_parameters``).
EXPERT_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("lora", {"r": 16, "target_modules": "all-linear", "target_parameters": "experts"}),
    ("lora", {"r": 16, "target_modules": "all-linear", "target_parameters": "experts", "experts_path": "routed"}),
    ("qlora", {"r": 16, "target_parameters": "experts"}),
    ("qlora", {"r": 16, "target_parameters": "experts", "experts_path": "routed"}),
)
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
PEFT_ADAPTER_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class Candidate:
    """One configuration with its predictions."""

    method: MethodConfig
    train: TrainSpec
    prediction: Prediction
    step: StepTime
    fits: bool
    headroom_bytes: int
    tokens: float | None = None
    usd_per_gpu_hour: float | None = None
    recipe: str = ""
    """The conf/recipe/*.yaml bundle this configuration is (its knobs are the recipe's), "" for none."""

    @property
    def train_time_s(self) -> float | None:
        return None if self.tokens is None else self.tokens / self.step.tokens_per_s

    @property
    def cost_usd(self) -> float | None:
        t = self.train_time_s
        if t is None or self.usd_per_gpu_hour is None:
            return None
        return t / 3600 * self.usd_per_gpu_hour * self.train.num_gpus

    def why_not(self, gpu: GpuSpec, headroom: float) -> str:
        """The overflow and the largest components, for a configuration that does not fit."""
        need = self.prediction.device_bytes - self.prediction.spillable_bytes
        top = sorted(self.prediction.components.items(), key=lambda kv: -kv[1])[:2]
        parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in top)
        usable = gpu.memory_bytes * (1 - headroom)
        return (f"needs {need / 2**30:.1f} GiB > {usable / 2**30:.1f} GiB usable on {gpu.name} "
                f"({100 * (1 - headroom):.0f}%; largest: {parts} GiB)")


@dataclass(frozen=True)
class Advice:
    ranked: list[Candidate]
    pareto: list[Candidate]
    near_misses: list[Candidate]
    searched: int = 0
    by: str = "time"
    headroom: float = 0.05


def micro_batches(global_batch: int, num_gpus: int) -> list[int]:
    """Micro-batches b with b * accum * num_gpus = global_batch (accum >= 1), ascending."""
    per_gpu = global_batch // num_gpus
    return [b for b in range(1, per_gpu + 1) if per_gpu % b == 0]


def _shardings(num_gpus: int) -> tuple[str, ...]:
    return ("none",) if num_gpus == 1 else ("none", "zero2", "zero3")


def method_variants(model: ModelSpec) -> tuple[tuple[str, dict[str, Any]], ...]:
    """The searched (method, knobs): :data:`METHOD_VARIANTS`, plus :data:`EXPERT_VARIANTS` on MoE models."""
    return METHOD_VARIANTS + (EXPERT_VARIANTS if model.has_fused_experts else ())


def _combos(model: ModelSpec, num_gpus: int) -> Iterator[tuple[str, dict[str, Any], bool, str, str, str]]:
    for (name, knobs), ckpt, opt, sharding in itertools.product(method_variants(model), (False, True), OPTIMIZERS,
                                                               _shardings(num_gpus)):
        for dtype in (("fp32",) if get_method(name).estimator.trains_base else PEFT_ADAPTER_DTYPES):
            yield name, knobs, ckpt, opt, sharding, dtype


def search(model: ModelSpec, gpu: GpuSpec, seq_len: int = 2048, global_batch: int = 32, num_gpus: int = 1,
           headroom: float = 0.05, tokens: float | None = None, usd_per_gpu_hour: float | None = None,
           by: str = "time", progress: Callable[[int, int], None] | None = None) -> Advice:
    """Every fitting configuration ranked by time (or cost), the Pareto set and the nearest misses.

    Args:
        headroom: fraction of the GPU's memory left free (a configuration fits when it needs at most
            (1 - headroom) of it).
        progress: called with (done, total) combinations as the search runs.
    """
    require(global_batch % num_gpus == 0, f"--global-batch {global_batch} is not a multiple of --gpus {num_gpus}",
            f"pass --global-batch {num_gpus * max(1, global_batch // num_gpus)}")
    require(0 <= headroom < 1, f"--headroom {headroom} must be in [0, 1)", "pass --headroom 0.05 (5% free)")
    require(by in ("time", "cost"), f"--by {by!r} is unknown", "use --by time or --by cost")
    price = usd_per_gpu_hour if usd_per_gpu_hour is not None else (gpu.usd_per_hour or None)
    budget = replace(gpu, memory_bytes=int(gpu.memory_bytes * (1 - headroom)))
    combos = list(_combos(model, num_gpus))
    batches = micro_batches(global_batch, num_gpus)
    fitting: list[Candidate] = []
    misses: list[Candidate] = []
    searched = 0
    for i, (name, knobs, ckpt, opt, sharding, dtype) in enumerate(combos):
        entry = get_method(name)
        method = make_config(name, {**knobs, **({} if entry.estimator.trains_base else {"adapter_dtype": dtype})})
        precision = entry.default_precision
        for b in batches:
            train = TrainSpec(micro_batch_size=b, seq_len=seq_len, precision=precision, gradient_checkpointing=ckpt,
                              optimizer=OptimizerSpec(opt), grad_accum_steps=global_batch // (num_gpus * b),
                              num_gpus=num_gpus, sharding=sharding)
            pred = predict(model, method, train, gpu)
            verdict = fits(pred, budget)
            step = predict_time(model, method, train, gpu)
            cand = Candidate(method, train, pred, step, verdict.fits, verdict.headroom_bytes, tokens, price)
            searched += 1
            if not verdict.fits:
                misses.append(cand)
                break
            fitting.append(cand)
        if progress:
            progress(i + 1, len(combos) + 1)
    for cand in _recipe_candidates(model, gpu, budget, seq_len, global_batch, num_gpus, batches, tokens, price):
        searched += 1
        (fitting if cand.fits else misses).append(cand)
    if progress:
        progress(len(combos) + 1, len(combos) + 1)
    key = (lambda c: c.cost_usd or c.step.step_time_s) if by == "cost" and price is not None and tokens \
        else (lambda c: c.step.step_time_s)
    ranked = sorted(fitting, key=key)
    return Advice(ranked, pareto(ranked), _nearest(misses, ranked), searched, by, headroom)


def _recipe_candidates(model: ModelSpec, gpu: GpuSpec, budget: GpuSpec, seq_len: int, global_batch: int,
                       num_gpus: int, batches: list[int], tokens: float | None, price: float | None) -> list[Candidate]:
    """Each recipe that selects a method (conf/recipe/*.yaml, its knobs as the stack sets them), walked by
    micro-batch like the other combinations (stops at the first that does not fit); stacks' refusals skipped."""
    from lorabench.errors import UserError
    from lorabench.recipes import check_stack, load_recipe, recipe_names, stack_method
    from lorabench.resolve import resolve_train

    out: list[Candidate] = []
    for name in recipe_names():
        recipe = load_recipe(name)
        if recipe.method is None:
            continue
        try:
            method = make_config(recipe.method, recipe.method_knobs)
        except UserError:
            continue
        for b in batches:
            fields = {**recipe.train, "micro_batch_size": b, "seq_len": seq_len, "num_gpus": num_gpus,
                      "grad_accum_steps": global_batch // (num_gpus * b)}
            try:
                train = resolve_train(fields, recipe.method, model, recipe.optimizer)
                applied = stack_method(model, method, train)
                check_stack(applied, train, get_method(recipe.method).estimator)
            except UserError:
                break
            pred = predict(model, applied, train, gpu)
            verdict = fits(pred, budget)
            cand = Candidate(applied, train, pred, predict_time(model, applied, train, gpu), verdict.fits,
                             verdict.headroom_bytes, tokens, price, recipe=name)
            out.append(cand)
            if not verdict.fits:
                break
    return out


def pareto(cands: list[Candidate]) -> list[Candidate]:
    """Configurations no other beats on both device memory and step time (sorted by time)."""
    out: list[Candidate] = []
    best_mem = float("inf")
    for c in sorted(cands, key=lambda c: (c.step.step_time_s, c.prediction.device_bytes)):
        if c.prediction.device_bytes < best_mem:
            out.append(c)
            best_mem = c.prediction.device_bytes
    return out


def _nearest(misses: list[Candidate], fitting: list[Candidate], n: int = 3) -> list[Candidate]:
    """Non-fitting configurations faster than the best fitting one, smallest overflow first."""
    best = fitting[0].step.step_time_s if fitting else float("inf")
    faster = [m for m in misses if m.step.step_time_s < best]
    out: list[Candidate] = []
    seen: set[tuple] = set()
    for c in sorted(faster or misses, key=lambda c: -c.headroom_bytes):
        key = (c.method, c.train.micro_batch_size, c.train.gradient_checkpointing)  # one row per shape
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out[:n]


def _knob_flags(method: MethodConfig) -> tuple[list[str], list[str]]:
    """(plan flags, Hydra overrides) for the method knobs that differ from the method's defaults."""
    default = type(method)()
    flags, overrides = [], []
    for key, value in method.to_dict().items():
        if key == "method" or value == default.to_dict().get(key):
            continue
        text = ",".join(value) if isinstance(value, list) else str(value)
        flags.append(f"--{key.replace('_', '-')} {text}")
        overrides.append(f"method.{key}={text}")
    return flags, overrides


def commands(model: ModelSpec, gpu: GpuSpec, c: Candidate) -> tuple[str, str]:
    """The exact ``lorabench plan`` and ``lorabench run`` that reproduce a candidate."""
    t = c.train
    if c.recipe:
        plan = f"lorabench plan --model {model.name} --recipe {c.recipe} --batch {t.micro_batch_size} --seq-len {t.seq_len}"
        run = (f"lorabench run model={model.name} recipe={c.recipe} train.micro_batch_size={t.micro_batch_size} "
               f"train.seq_len={t.seq_len}")
        if t.grad_accum_steps > 1:
            plan += f" --grad-accum {t.grad_accum_steps}"
            run += f" train.grad_accum_steps={t.grad_accum_steps}"
        return plan + f" --gpu {gpu.name}" + (f" --gpus {t.num_gpus}" if t.num_gpus > 1 else ""), \
            run + f" gpu={gpu.name}" + (f" train.num_gpus={t.num_gpus}" if t.num_gpus > 1 else "")
    flags, overrides = _knob_flags(c.method)
    plan = [f"lorabench plan --model {model.name} --method {c.method.name}", *flags,
            f"--batch {t.micro_batch_size} --seq-len {t.seq_len} --precision {t.precision}"]
    run = [f"lorabench run model={model.name} method={c.method.name}", *overrides,
           f"train.micro_batch_size={t.micro_batch_size} train.seq_len={t.seq_len} train.precision={t.precision}"]
    if t.grad_accum_steps > 1:
        plan.append(f"--grad-accum {t.grad_accum_steps}")
        run.append(f"train.grad_accum_steps={t.grad_accum_steps}")
    if t.gradient_checkpointing:
        plan.append("--checkpointing")
        run.append("train.gradient_checkpointing=true")
    if t.optimizer.name != "adamw":
        plan.append(f"--optimizer {t.optimizer.name}")
        run.append(f"optimizer={t.optimizer.name}")
    plan.append(f"--gpu {gpu.name}")
    run.append(f"gpu={gpu.name}")
    if t.num_gpus > 1:
        plan.append(f"--gpus {t.num_gpus} --sharding {t.sharding}")
        run.append(f"train.num_gpus={t.num_gpus} train.sharding={t.sharding}")
    return " ".join(plan), " ".join(run)
