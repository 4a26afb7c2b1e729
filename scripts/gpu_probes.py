"""Plan the OOM probes of the GPU validation campaign: configs capped just below and just above the
planner's predicted memory, so that one GPU probes many fit/OOM boundaries.

A probe is a config of the validation grid (``conf/sweep/<preset>.yaml``, composed by Hydra exactly as the sweep
runner composes it, :func:`lorabench.sweep.build_specs`) run twice with ``memory_cap_bytes`` set:

- *below*: ``floor(A * (1 - margin))`` with A the predicted tensor peak (``peak_allocated_bytes``): the run must
  OOM if the planner's allocated prediction is within ``margin`` (no allocator can serve more live tensor bytes
  than its cap: ``set_per_process_memory_fraction`` bounds reserved >= allocated);
- *above*: ``ceil(R * (1 + margin))`` with R the predicted *reserved* peak on CUDA (allocated + allocator slack,
  the level ``set_per_process_memory_fraction`` limits) or A on the CPU (where the tracker caps tensor bytes):
  the run must fit.

Between A and R the outcome depends on how well the caching allocator packs blocks once capped (it frees its
cache and retries before it raises), so no probe is placed there. The runner records ``predicted.fits`` as
``R <= cap`` on CUDA (:func:`lorabench.sweep.predicted_block`), so the expected verdicts are OOM below, fit above.

Candidates are the grid configs whose *above* cap leaves the CUDA context room on the GPU; for each method,
``--per-method`` of them are picked at evenly spaced quantiles of R (deterministic), spreading the boundaries over
the GPU's memory.

Usage (prints one line of Hydra overrides per probe; ``scripts/gpu_campaign.sh probes`` runs each line as a
two-job multirun)::

    python scripts/gpu_probes.py --gpu h100-80gb
    python scripts/gpu_probes.py --device cpu --set model=tiny-llama --set train.seq_len=32 --format json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Relative distance of each cap from the planner's level (the campaign's max error target is 5 %).
DEFAULT_MARGIN = 0.05


@dataclass(frozen=True)
class Probe:
    """One probed config: its Hydra overrides, the planner's levels and the two caps."""

    overrides: dict[str, str]
    allocated_bytes: int
    reserved_bytes: int
    cap_below_bytes: int
    cap_above_bytes: int

    def hydra_line(self) -> str:
        """``key=value ... memory_cap_bytes=below,above`` (a two-job Hydra multirun)."""
        keys = " ".join(f"{k}={v}" for k, v in self.overrides.items())
        return f"{keys} memory_cap_bytes={self.cap_below_bytes},{self.cap_above_bytes}"


def sweep_params(preset: str, replace: dict[str, str]) -> dict[str, list[str]]:
    """The preset's ``hydra.sweeper.params`` as key -> values, with ``replace`` (``key=a,b``) applied."""
    import yaml

    doc = yaml.safe_load((ROOT / "conf" / "sweep" / f"{preset}.yaml").read_text())
    params = {k: str(v) for k, v in ((doc.get("hydra") or {}).get("sweeper") or {}).get("params", {}).items()}
    params.update(replace)
    return {k: [x.strip() for x in v.split(",") if x.strip()] for k, v in params.items()}


def compose_grid(preset: str, replace: dict[str, str], extra: list[str]) -> list[tuple[dict[str, str], Any]]:
    """Every (overrides, composed cfg) of the grid, jobs excluded by ``sweep_exclude`` left out."""
    from hydra import compose, initialize_config_dir

    from lorabench.sweep import CONF_DIR, is_excluded

    params = sweep_params(preset, replace)
    keys = list(params)
    out = []
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        for values in itertools.product(*(params[k] for k in keys)):
            overrides = dict(zip(keys, values))
            cfg = compose("config", overrides=[f"sweep={preset}", *extra, *(f"{k}={v}" for k, v in overrides.items())])
            if not is_excluded(cfg):
                out.append((overrides, cfg))
    return out


def probe_for(overrides: dict[str, str], cfg: Any, device: str, margin: float) -> Probe:
    """The planner's levels for one composed config and the caps just below and above them."""
    from lorabench.memory import planner
    from lorabench.sweep import build_specs

    specs = build_specs(cfg)
    pred = planner.predict(specs.model, specs.method, specs.train, specs.gpu)
    upper = pred.reserved_bytes if device == "cuda" else pred.peak_allocated_bytes
    return Probe(overrides=overrides, allocated_bytes=pred.peak_allocated_bytes, reserved_bytes=pred.reserved_bytes,
                 cap_below_bytes=math.floor(pred.peak_allocated_bytes * (1 - margin)),
                 cap_above_bytes=math.ceil(upper * (1 + margin)))


def usable_cap_bytes(cfg: Any, device: str) -> int | None:
    """Largest cap a probe may use: the GPU's memory minus the planner's CUDA context (None on the CPU)."""
    if device != "cuda" or not cfg.get("gpu"):
        return None
    from lorabench.catalog import load_gpu
    from lorabench.memory import planner

    gpu = load_gpu(str(cfg.gpu.name))
    return gpu.memory_bytes - int(planner.calibration(gpu.name)["cuda_context_bytes"])


def pick(candidates: list[Probe], per_method: int) -> list[Probe]:
    """Per method, ``per_method`` probes at the (k+1)/(n+1) quantiles of predicted reserved bytes."""
    chosen: list[Probe] = []
    methods = sorted({p.overrides.get("method", "") for p in candidates})
    for method in methods:
        pool = sorted((p for p in candidates if p.overrides.get("method", "") == method),
                      key=lambda p: (p.reserved_bytes, sorted(p.overrides.items())))
        picked: list[Probe] = []
        for k in range(min(per_method, len(pool))):
            probe = pool[min(len(pool) - 1, round((k + 1) * (len(pool) - 1) / (per_method + 1)))]
            if probe not in picked:
                picked.append(probe)
        chosen += picked
    return chosen


def plan(preset: str = "gpu-validate", device: str = "cuda", margin: float = DEFAULT_MARGIN, per_method: int = 2,
         replace: dict[str, str] | None = None, extra: list[str] | None = None) -> list[Probe]:
    """The probes of a campaign (see the module docstring)."""
    if not 0 < margin < 0.5:
        raise ValueError(f"margin {margin} must be in (0, 0.5)")
    candidates = []
    for overrides, cfg in compose_grid(preset, dict(replace or {}), list(extra or [])):
        probe = probe_for(overrides, cfg, device, margin)
        limit = usable_cap_bytes(cfg, device)
        if limit is None or probe.cap_above_bytes <= limit:
            candidates.append(probe)
    return pick(candidates, per_method)


def _key_values(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"gpu_probes: --set {item!r} is not key=value[,value...]")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpu-validate", help="conf/sweep/<preset>.yaml whose grid is probed")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--gpu", default=None, help="catalog GPU (default: the preset's)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="relative distance of each cap")
    parser.add_argument("--per-method", type=int, default=2, help="probed configs per method")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                        help="replace one of the preset's swept keys (repeatable)")
    parser.add_argument("--format", choices=["overrides", "json"], default="overrides")
    args = parser.parse_args(argv)
    extra = [f"device={args.device}"] + ([f"gpu={args.gpu}"] if args.gpu else [])
    probes = plan(args.preset, args.device, args.margin, args.per_method, _key_values(args.set), extra)
    if args.format == "json":
        print(json.dumps([asdict(p) for p in probes], indent=2))
    else:
        for probe in probes:
            print(probe.hydra_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
