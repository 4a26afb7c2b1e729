#!/usr/bin/env bash
# The GPU validation campaign as time-boxed device commands (docs/GPU_CAMPAIGN.md has the plan).
#
# Stages (several may share one device command: `probes,perf`; the whole command stops starting work after
# BUDGET_S=540 s so it ends inside the device's 10-minute limit, and copies what it has to $OUT):
#   validate-a   sweep=gpu-validate on qwen2.5-0.5b and llama-3.2-1b (96 jobs)       -> results/gpu-validate/
#   validate-b   sweep=gpu-validate on llama-2-7b and llama-2-13b (48 + 8 QLoRA jobs)  -> results/gpu-validate/
#   probes       OOM probes planned by scripts/gpu_probes.py (12 configs x 2 caps)     -> results/gpu-probes/
#   perf         scripts/bench_qlora.py: lorabench vs bitsandbytes QLoRA vs bf16 LoRA, NF4 dequantize GB/s
#   dry-run      (here, no GPU) the same pipeline on tiny models on the CPU into /tmp/lorabench-dry-run, then
#                calibrate (must refuse: no cuda records) and `lorabench report`
#   collect DIR  (here) merge the reply's DIR/<sweep>.records.jsonl into results/<sweep>/records.jsonl and copy
#                env/provenance/bench files into results/gpu-campaign/
# Every GPU stage starts with a preflight (one tiny QLoRA job through the real runner on cuda, and bitsandbytes'
# CUDA library) and stops at once when it fails. Sweep stages resume: jobs already recorded ok/oom/nan/failed
# are skipped (RETRY_FAILED=1 retries failed ones), so a stage that ends "INCOMPLETE" is run again, after
# `collect` (the records travel with the working tree).
#
# Once, here:  bash scripts/fetch_gpu_wheels.sh                        (.whl/, ~7 MiB, git-ignored)
# Each device call (the `run` tool; kind nvidia-h100-x1 or nvidia-h200, the GPU is detected through NVML):
#   command:   bash scripts/gpu_campaign.sh validate-a --commit <output of `git rev-parse HEAD` here>
#   carry:     [".whl"]
#   timeout_s: 600
# then here:   bash scripts/gpu_campaign.sh collect <the reply's files_at folder>
# At the end, here: python scripts/calibrate.py; lorabench report results/gpu-validate; lorabench report
# results/gpu-probes; python -m pytest -q tests/test_gpu_records.py; the lead commits results/, reports/ and
# conf/calibration/<gpu>.yaml.
#
# Environment: BUDGET_S (default 540), GPU (catalog name, default detected), RETRY_FAILED=1, PYTHON (default
# .venv/bin/python if present, else python3), RESULTS_DIR (default results/), DRY_RUN_DIR (/tmp/lorabench-dry-run).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STAGES="${1:-}"
shift || true
COMMIT=""
COLLECT_DIR=""
while (($#)); do
  case "$1" in
    --commit) COMMIT="${2:-}"; shift 2 ;;
    *) if [[ "$STAGES" == collect && -z "$COLLECT_DIR" ]]; then COLLECT_DIR="$1"; shift
       else echo "gpu_campaign: unknown argument '$1'" >&2; exit 2; fi ;;
  esac
done
if [[ -x .venv/bin/python ]]; then PY="${PYTHON:-.venv/bin/python}"; else PY="${PYTHON:-python3}"; fi
BUDGET_S="${BUDGET_S:-540}"
START_S=$(date +%s)
RESULTS="${RESULTS_DIR:-$ROOT/results}"
RESUME_SKIP="[ok,oom,nan,failed]"
[[ "${RETRY_FAILED:-0}" == 1 ]] && RESUME_SKIP="[ok,oom,nan]"
SWEEP_EXTRA=()
HYDRA_SCRATCH=""
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1

log() { echo "[gpu_campaign $(date -u +%H:%M:%S) +$(( $(date +%s) - START_S ))s] $*"; }
remaining_s() { echo $(( START_S + BUDGET_S - $(date +%s) )); }

install_wheels() {  # install_wheels SITE: the carried wheels, exactly as the device README says
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" .whl/*.whl \
      || { log "pip could not install .whl/*.whl"; return 1; }
    export PYTHONPATH="$1:$ROOT"
    log "installed $(ls .whl | tr '\n' ' ')into $1"
  else
    export PYTHONPATH="$ROOT"
    log "no .whl/ here (run scripts/fetch_gpu_wheels.sh and carry .whl); using the installed packages"
  fi
  "$PY" -c "import hydra, omegaconf, torch, transformers" \
    || { log "hydra/omegaconf/torch/transformers do not import: carry .whl (scripts/fetch_gpu_wheels.sh)"; return 1; }
}

record_env() {  # record_env FILE: the machine, the driver and every version the records depend on
  {
    echo "stages: $STAGES  commit: $COMMIT  date: $(date -u +%FT%TZ)  host: $(uname -a)"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    else
      echo "nvidia-smi: not available (no NVIDIA driver here)"
    fi
    "$PY" - <<'EOF'
import importlib.metadata as md, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
for dist in ("transformers", "bitsandbytes", "hydra-core", "omegaconf", "antlr4-python3-runtime", "peft",
             "nvidia-ml-py", "pandas", "numpy"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} (not installed)")
EOF
  } >"$1" 2>&1
  log "environment recorded in $1"
}

detect_gpu() {
  if [[ -n "${GPU:-}" ]]; then echo "$GPU"; return; fi
  "$PY" -c "from lorabench.runtime.probe import detect_gpu; g = detect_gpu(); print(g.name if g else '')"
}

count_records() {  # count_records SWEEP_NAME
  local file="$RESULTS/$1/records.jsonl"
  if [[ -f "$file" ]]; then grep -c . "$file"; else echo 0; fi
}

run_sweep() {  # run_sweep SWEEP_NAME OVERRIDES...: one time-boxed multirun of the gpu-validate preset
  local name="$1" left rc hydra_dir=()
  shift
  left=$(remaining_s)
  if ((left < 45)); then log "no time left for $name $*"; return 124; fi
  [[ -n "$HYDRA_SCRATCH" ]] && hydra_dir=("hydra.sweep.dir=$HYDRA_SCRATCH/$name-$(date +%s%N)")
  log "sweep $name: $* (at most ${left}s)"
  timeout --kill-after=20 "$left" "$PY" -m lorabench.sweep -m sweep=gpu-validate "sweep_name=$name" \
    "results_dir=$RESULTS" "resume_skip=$RESUME_SKIP" "${SWEEP_EXTRA[@]}" "${hydra_dir[@]}" "$@"
  rc=$?
  ((rc == 124 || rc == 137)) && { log "sweep $name stopped at the time box"; return 124; }
  return "$rc"
}

export_records() {  # export_records SWEEP_NAME RECORDS_BEFORE T0: copy to $OUT; counts and seconds per new record
  local file="$RESULTS/$1/records.jsonl" added
  [[ -f "$file" ]] || { log "no records in $file"; return 0; }
  cp "$file" "$OUT/$1.records.jsonl"
  added=$(( $(count_records "$1") - $2 ))
  log "$1: $added new records in $(( $(date +%s) - $3 ))s ($(( added > 0 ? ($(date +%s) - $3) / added : 0 ))s each)"
  "$PY" - "$file" <<'EOF'
import collections, sys
from lorabench.records import read_records
recs, warnings = read_records(sys.argv[1])
count = collections.Counter((r["config"]["device"], r["status"]) for r in recs)
print(f"{sys.argv[1]}: {len(recs)} records; " + ", ".join(f"{d} {s}: {n}" for (d, s), n in sorted(count.items())))
for r in recs:
    if r["status"] == "failed":
        print(f"  failed {r['config']['model']} {r['config']['method']['method']}: {(r['error'] or '')[:200]}")
for w in warnings:
    print("  warning:", w)
EOF
}

finish() {  # finish STAGE STATUS: provenance (read by collect) and the stage's verdict line
  printf '{"stage": "%s", "commit": "%s", "gpu": "%s", "status": "%s", "seconds": %d}\n' \
    "$1" "$COMMIT" "${GPU_NAME:-}" "$2" $(( $(date +%s) - START_S )) >"$OUT/provenance-$1.json"
  if [[ "$2" == complete ]]; then log "stage $1 complete"; else log "stage $1 INCOMPLETE ($2): run it again"; fi
  [[ "$2" == complete ]]
}

sweep_stage() {  # sweep_stage STAGE SWEEP_NAME OVERRIDES...
  local stage="$1" name="$2" before t0 rc
  shift 2
  before=$(count_records "$name"); t0=$(date +%s)
  run_sweep "$name" "$@"
  rc=$?
  export_records "$name" "$before" "$t0"
  if ((rc == 0)); then finish "$stage" complete; else finish "$stage" "rc=$rc"; fi
}

probes_stage() {  # probes_stage STAGE PLANNER_ARGS...: one two-job multirun per planned probe config
  local stage="$1" plan="$SCRATCH_DIR/probes.txt" rc=0 line before t0
  shift
  before=$(count_records gpu-probes); t0=$(date +%s)
  "$PY" scripts/gpu_probes.py "$@" >"$plan" || { finish "$stage" "planning failed"; return; }
  log "$(wc -l <"$plan") probe configs, two caps each"
  while read -r line; do
    # shellcheck disable=SC2086 # one Hydra override per word
    run_sweep gpu-probes $line || { rc=$?; break; }
  done <"$plan"
  export_records gpu-probes "$before" "$t0"
  if ((rc == 0)); then finish "$stage" complete; else finish "$stage" "rc=$rc"; fi
}

perf_stage() {  # perf_stage STAGE BENCH_ARGS...
  local stage="$1" left rc
  shift
  left=$(remaining_s)
  if ((left < 60)); then finish "$stage" "no time left"; return; fi
  timeout --kill-after=20 "$left" "$PY" scripts/bench_qlora.py --out "$OUT/bench_qlora.json" "$@"
  rc=$?
  if ((rc == 0)); then finish "$stage" complete; else finish "$stage" "rc=$rc"; fi
}

preflight() {  # one tiny QLoRA job through the real runner on cuda, and bitsandbytes' CUDA library
  local dir="$SCRATCH_DIR/preflight"
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" || return 1
  "$PY" - <<'EOF' || log "WARNING: bitsandbytes NF4 does not run on cuda: the perf stage's bnb variant will fail"
import logging, torch
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
import bitsandbytes.functional as F
packed, state = F.quantize_4bit(torch.randn(256, 256, device="cuda", dtype=torch.bfloat16), quant_type="nf4")
assert F.dequantize_4bit(packed, state).shape == (256, 256)
print("preflight: bitsandbytes", __import__("bitsandbytes").__version__, "NF4 on cuda ok")
EOF
  timeout 120 "$PY" -m lorabench.sweep device=cuda "gpu=$GPU_NAME" model=tiny-llama method=qlora \
    train.micro_batch_size=1 train.seq_len=32 train.warmup_steps=1 train.timed_steps=1 sweep_name=preflight \
    "results_dir=$dir" "hydra.run.dir=$dir/hydra" || return 1
  "$PY" - "$dir/preflight/records.jsonl" <<'EOF'
import sys
from lorabench.records import read_records
(record,), _ = read_records(sys.argv[1])
m = record["measured"] or {}
print(f"preflight: runner on cuda {record['status']}, allocated {m.get('torch_max_allocated_bytes')}, "
      f"reserved {m.get('torch_max_reserved_bytes')}, NVML {m.get('nvml_peak_used_bytes')}; error {record['error']}")
sys.exit(0 if record["status"] == "ok" and m.get("nvml_peak_used_bytes") else 1)
EOF
}

collect() {  # collect DIR (here): union-merge the returned records into results/, unknown commits filled in
  [[ -d "$COLLECT_DIR" ]] || { echo "gpu_campaign: collect needs the reply's files_at folder" >&2; exit 2; }
  "$PY" - "$COLLECT_DIR" "$RESULTS" <<'EOF'
import json, pathlib, sys
src, results = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
commits = {json.loads(p.read_text()).get("commit") for p in src.glob("provenance-*.json")} - {"", None, "unknown"}
commit = commits.pop() if len(commits) == 1 else None
key = lambda r: (r.get("run_id"), r.get("timestamp"), r.get("status"))  # one attempt of one run
for returned in sorted(src.glob("*.records.jsonl")):
    local = results / returned.name.removesuffix(".records.jsonl") / "records.jsonl"
    seen = set()
    if local.exists():
        for raw in local.read_text().splitlines():
            try:
                seen.add(key(json.loads(raw)))
            except json.JSONDecodeError:
                pass
    new, filled, torn = [], 0, 0
    for raw in returned.read_text().splitlines():
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            torn += 1  # a line cut off on the device; its run is re-run by the next call
            continue
        if key(record) in seen:
            continue
        env = record.get("env") or {}
        if commit and env.get("git_commit") in (None, "unknown"):
            env.update(git_commit=commit, git_commit_source="gpu_campaign.sh --commit (no git checkout on the device)")
            record["env"], filled = env, filled + 1
        seen.add(key(record))
        new.append(json.dumps(record, ensure_ascii=True, allow_nan=False))
    local.parent.mkdir(parents=True, exist_ok=True)
    if new:
        with local.open("a") as fh:
            fh.write("\n".join(new) + "\n")
    print(f"{local}: {len(new)} new records (git commit filled in {filled}, {torn} torn lines skipped)")
campaign = results / "gpu-campaign"  # environment, provenance and the perf result, committed beside the records
for extra in [*src.glob("env-*.txt"), *src.glob("provenance-*.json"), *src.glob("bench_qlora.json"),
              *src.glob("*.log")]:
    campaign.mkdir(parents=True, exist_ok=True)
    (campaign / extra.name).write_bytes(extra.read_bytes())
    print(f"{campaign / extra.name}: copied")
EOF
}

dry_run() {  # the whole pipeline on the CPU with tiny models, into a scratch folder under /tmp
  local rc before t0
  RESULTS="$SCRATCH_DIR/results"
  SWEEP_EXTRA=(device=cpu gpu=h100-80gb num_threads=1 train.warmup_steps=1 train.timed_steps=2)
  HYDRA_SCRATCH="$SCRATCH_DIR/hydra"
  GPU_NAME=h100-80gb
  log "dry run into $SCRATCH_DIR (device cpu, tiny models; catalog GPU h100-80gb only for fits/bandwidth fields)"
  sweep_stage dry-run-validate gpu-validate model=tiny-llama train.micro_batch_size=1 train.seq_len=32 || return 1
  probes_stage dry-run-probes --device cpu --gpu h100-80gb --per-method 1 --set model=tiny-llama \
    --set method=lora,qlora --set train.micro_batch_size=1 --set train.seq_len=32 || return 1
  perf_stage dry-run-perf --device cpu --model tiny-llama --batch 2 --seq-len 64 --warmup 2 --steps 5 --threads 1 \
    --nf4-rows 1024 --nf4-cols 1024 --nf4-repeats 5 || return 1
  "$PY" scripts/calibrate.py --records "$RESULTS/gpu-validate/records.jsonl" "$RESULTS/gpu-probes/records.jsonl" \
    --out "$SCRATCH_DIR/calibration.yaml"
  rc=$?
  if ((rc == 2)); then log "calibrate refused as it must (exit 2: no cuda records)"
  else log "ERROR: calibrate exited $rc on CPU records (expected 2)"; return 1; fi
  for sweep in gpu-validate gpu-probes; do
    "$PY" -m lorabench.cli report "$RESULTS/$sweep" --out "$SCRATCH_DIR/reports/$sweep" \
      || { log "ERROR: lorabench report failed on $sweep"; return 1; }
  done
  log "dry run done: records in $RESULTS, reports in $SCRATCH_DIR/reports, device files in $OUT"
}

main() {
  local stage
  log "stages $STAGES in $ROOT (budget ${BUDGET_S}s, commit $COMMIT)"
  install_wheels "$SITE_DIR" || return 1
  record_env "$OUT/env-${STAGES//,/_}.txt"
  if [[ "$STAGES" == dry-run ]]; then dry_run; return; fi
  GPU_NAME="$(detect_gpu)"
  [[ -n "$GPU_NAME" ]] || { log "no catalog GPU matches this device (add conf/gpu/*.yaml or set GPU=)"; return 1; }
  SWEEP_EXTRA=("gpu=$GPU_NAME")
  log "GPU: $GPU_NAME"
  preflight || { log "preflight FAILED: nothing else was run (see above)"; return 1; }
  for stage in ${STAGES//,/ }; do
    case "$stage" in
      validate-a) sweep_stage "$stage" gpu-validate model=qwen2.5-0.5b,llama-3.2-1b ;;
      validate-b) sweep_stage "$stage" gpu-validate model=llama-2-7b,llama-2-13b ;;
      probes) probes_stage "$stage" --gpu "$GPU_NAME" ;;
      perf) perf_stage "$stage" --gpu "$GPU_NAME" ;;
    esac
  done
}

if [[ "$STAGES" == collect ]]; then collect; exit $?; fi
for stage in ${STAGES//,/ }; do
  case "$stage" in
    validate-a|validate-b|probes|perf) ;;
    dry-run) [[ "$STAGES" == dry-run ]] || { echo "gpu_campaign: dry-run runs alone" >&2; exit 2; } ;;
    *) echo "usage: bash scripts/gpu_campaign.sh STAGE[,STAGE...] [--commit SHA] | dry-run | collect DIR" \
            "(STAGE: validate-a validate-b probes perf)" >&2
       exit 2 ;;
  esac
done
[[ -n "$STAGES" ]] || { echo "usage: bash scripts/gpu_campaign.sh STAGE[,STAGE...] [--commit SHA]" >&2; exit 2; }
[[ -n "$COMMIT" ]] || COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
export LORABENCH_GIT_COMMIT="$COMMIT"
if [[ "$STAGES" == dry-run ]]; then
  SCRATCH_DIR="${DRY_RUN_DIR:-/tmp/lorabench-dry-run}"
  [[ "$SCRATCH_DIR" == /tmp/?* ]] || { echo "gpu_campaign: DRY_RUN_DIR must be under /tmp" >&2; exit 2; }
  rm -rf "$SCRATCH_DIR"
  BUDGET_S="${BUDGET_S_DRY_RUN:-3600}"
  OUT="${OUT:-$SCRATCH_DIR/out}"
  SITE_DIR="$SCRATCH_DIR/site"
else
  [[ -n "${OUT:-}" ]] || { echo "gpu_campaign: \$OUT is unset (run GPU stages through the device tool)" >&2; exit 2; }
  SCRATCH_DIR="$(mktemp -d /tmp/lorabench-campaign.XXXXXX)"
  SITE_DIR=/tmp/site  # the device README's --target
fi
mkdir -p "$SCRATCH_DIR" "$OUT"
main 2>&1 | tee "$OUT/${STAGES//,/_}.log"
exit "${PIPESTATUS[0]}"
