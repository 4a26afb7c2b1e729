"""The campaign's job list, in priority order: any prefix is a balanced, useful sample.

Order (the ``campaign`` node of ``conf/sweep/gpu-campaign.yaml``; the dry run's ``gpu-campaign-dry.yaml`` has
the same structure on tiny models):

1. **validate** (records in ``gpu-validate``): per model in the listed order (smallest first), the shape grid
   micro-batch x seq_len x checkpointing in :func:`balanced_shapes` order, all methods at each shape. So the
   first ``len(methods)`` jobs cover every method once, the first half of a model's jobs a half fraction of
   the 2^3 shape design (every factor and every pair of factors balanced), the whole model the full design.
   ``methods_by_model`` restricts a model to some methods (QLoRA only on llama-2-13b). With ``rounds: 2``
   (the GPU preset) every model's first half fraction comes before any model's second half. ``extra_jobs``
   (lists of overrides, e.g. LoRA on Mixtral-8x7B's fused experts) come right after the first round.
2. **probes** (``gpu-probes``): per emulated card (a memory cap through ``set_per_process_memory_fraction``;
   on the CPU the tracker's cap) the config of the probe grid whose predicted level lies just below the cap
   (the planner says fits, it must run) and the one just above it (the planner says OOM, it must OOM), at
   least ``probe_margin`` away from the cap (:func:`probe_jobs`).
3. **perf**: ``scripts/bench_qlora.py`` with the preset's arguments (lorabench QLoRA vs bitsandbytes + PEFT-style
   LoRA vs bf16 LoRA in one run, NF4 dequantize GB/s vs the GPU's bandwidth).

Jobs are lists of Hydra overrides on top of the preset, so each job composes exactly as
``lorabench run sweep=gpu-campaign <overrides>`` would and gets the same run_id.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Sequence

#: The 2^3 (micro-batch, seq_len, checkpointing) design as (low/high) bit triples: first the half fraction
#: with an even number of highs (each factor and each pair balanced within 4 runs), then its complement.
BALANCED_ORDER: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1), (0, 0, 1), (0, 1, 0), (1, 0, 0))


@dataclasses.dataclass(frozen=True)
class CampaignJob:
    """One entry of the campaign: a record job (``stage`` validate/probes) or the perf stage."""

    stage: str
    sweep_name: str
    overrides: tuple[str, ...] = ()

    def label(self) -> str:
        keys = ("model", "method", "train.micro_batch_size", "train.seq_len", "train.gradient_checkpointing",
                "memory_cap_bytes")
        values = dict(o.split("=", 1) for o in self.overrides if "=" in o)
        return " ".join(f"{k.split('.')[-1]}={values[k]}" for k in keys if k in values) or self.stage


def balanced_shapes(micro_batches: Sequence[int], seq_lens: Sequence[int],
                    checkpointing: Sequence[bool]) -> list[tuple[int, int, bool]]:
    """The 2 x 2 x 2 shape grid in :data:`BALANCED_ORDER` (low = first listed value, high = second)."""
    if not (len(micro_batches) == len(seq_lens) == len(checkpointing) == 2):
        raise ValueError("the campaign's shape grid is 2 x 2 x 2 (two micro-batches, seq lens, ckpt values)")
    return [(micro_batches[b], seq_lens[s], checkpointing[c]) for b, s, c in BALANCED_ORDER]


def shape_overrides(micro_batch: int, seq_len: int, ckpt: bool) -> tuple[str, ...]:
    return (f"train.micro_batch_size={micro_batch}", f"train.seq_len={seq_len}",
            f"train.gradient_checkpointing={str(ckpt).lower()}")


def validation_jobs(campaign: dict[str, Any]) -> list[CampaignJob]:
    """Stage 1 in priority order (see the module docstring).

    With ``rounds: 2`` the shape design is split into its two half fractions: every model gets the first half
    (each factor and pair balanced) before any model gets the second, so a prefix that ends inside the big
    models still holds a balanced sample of every smaller one; ``rounds: 1`` runs each model's full design
    before the next model.
    """
    shapes = balanced_shapes(campaign["micro_batches"], campaign["seq_lens"], campaign["checkpointing"])
    rounds = int(campaign.get("rounds", 1))
    if rounds not in (1, 2):
        raise ValueError("campaign.rounds is 1 (model by model) or 2 (half fraction of every model first)")
    restricted = campaign.get("methods_by_model") or {}
    extra = [CampaignJob("validate", campaign["validate_sweep"], tuple(str(o) for o in overrides))
             for overrides in campaign.get("extra_jobs") or []]
    jobs = []
    for i, part in enumerate((shapes[:4], shapes[4:]) if rounds == 2 else (shapes,)):
        for model in campaign["models"]:
            methods = restricted.get(model, campaign["methods"])
            for shape in part:
                jobs += [CampaignJob("validate", campaign["validate_sweep"],
                                     (f"model={model}", f"method={method}", *shape_overrides(*shape)))
                         for method in methods]
        if i == 0:
            jobs += extra
    return jobs


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A probe-grid config and the planner's level the cap is compared with (reserved on CUDA, tensors on CPU)."""

    overrides: tuple[str, ...]
    level_bytes: int


def probe_candidates(grid: Iterable[tuple[tuple[str, ...], Any]], device: str) -> list[Candidate]:
    """The planner's level of every (overrides, JobSpecs) of the probe grid (configs it cannot predict left out)."""
    from lorabench.memory import planner

    out = []
    for overrides, specs in grid:
        try:
            p = planner.predict(specs.model, specs.method, specs.train, specs.gpu)
        except Exception:  # e.g. a knob the planner refuses for this model: not a probe
            continue
        out.append(Candidate(overrides, int(p.peak_allocated_bytes if device == "cpu" else p.reserved_bytes)))
    return out


def pick_probes(candidates: list[Candidate], caps_bytes: Sequence[int], margin: float) -> list[tuple[Candidate, int]]:
    """(candidate, cap) pairs: per cap the highest level <= cap (1 - margin) and the lowest >= cap (1 + margin).

    Each side takes the nearest config not used by an earlier probe, so the probes spread over configs.
    """
    used: set[tuple[str, ...]] = set()
    out = []
    for cap in caps_bytes:
        below = [c for c in candidates if c.level_bytes <= cap * (1 - margin) and c.overrides not in used]
        above = [c for c in candidates if c.level_bytes >= cap * (1 + margin) and c.overrides not in used]
        for side in (max(below, key=lambda c: c.level_bytes, default=None),
                     min(above, key=lambda c: c.level_bytes, default=None)):
            if side is not None:
                used.add(side.overrides)
                out.append((side, int(cap)))
    return out


def probe_grid_overrides(campaign: dict[str, Any]) -> list[tuple[str, ...]]:
    """Every (model, method, micro-batch, seq_len, checkpointing) of the probe grid, as overrides."""
    grid = campaign["probe_grid"]
    return [(f"model={m}", f"method={meth}", *shape_overrides(b, s, c))
            for m, meth, b, s, c in itertools.product(grid["models"], grid["methods"], grid["micro_batches"],
                                                      grid["seq_lens"], grid["checkpointing"])]


def probe_jobs(picks: list[tuple[Candidate, int]], sweep_name: str) -> list[CampaignJob]:
    return [CampaignJob("probes", sweep_name, (*c.overrides, f"memory_cap_bytes={cap}")) for c, cap in picks]


def card_caps_bytes(gpu_names: Sequence[str], context_bytes: int) -> list[int]:
    """Allocator caps emulating each catalog card: its memory minus the CUDA context the planner adds."""
    from lorabench.catalog import load_gpu

    return [load_gpu(name).memory_bytes - context_bytes for name in gpu_names]
