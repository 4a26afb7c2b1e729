#!/usr/bin/env bash
# The GPU validation campaign as ONE device command, its CPU dry run, and collecting the results (docs/GPU_CAMPAIGN.md).
#
#   bash scripts/gpu_campaign.sh run --commit SHA   # on the GPU machine (device tool, carry [".whl"], timeout_s 540)
#   bash scripts/gpu_campaign.sh dry-run            # here: the same code path on tiny models on the CPU, < 4 min
#   bash scripts/gpu_campaign.sh collect DIR        # here: merge a reply's files (DIR = its files_at) into results/
#
# run: installs the carried wheels (.whl/ from scripts/fetch_gpu_wheels.sh) into /tmp/site, records nvidia-smi and
# every version in $OUT/env.txt, then `python -m lorabench.campaign` (preset conf/sweep/gpu-campaign.yaml): every job
# checked first, then validate -> probes -> perf in priority order, one forked child per job from a job server that
# imported torch once, each record appended to results/<sweep>/records.jsonl AND copied to $OUT/<sweep>.records.jsonl
# at once. It stops starting jobs so that everything is over BUDGET_S (default 510) seconds after this script
# started, inside the device's 540 s limit. A second call resumes (carried-back records are skipped).
# The last line of a run, dry or real: `campaign: N ok, M oom, K failed, overhead median X s/job, elapsed Y s`.
#
# Environment: BUDGET_S, PYTHON (default .venv/bin/python if present, else python3), DRY_RUN_DIR (/tmp/lorabench-dry-run),
# DRY_BUDGET_S (default 150: the campaign part of the dry run; calibrate and report follow).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START_S=$(date +%s)
MODE="${1:-}"
shift || true
COMMIT=""
COLLECT_DIR=""
while (($#)); do
  case "$1" in
    --commit) COMMIT="${2:-}"; shift 2 ;;
    *) if [[ "$MODE" == collect && -z "$COLLECT_DIR" ]]; then COLLECT_DIR="$1"; shift
       else echo "gpu_campaign: unknown argument '$1'" >&2; exit 2; fi ;;
  esac
done
if [[ -x .venv/bin/python ]]; then PY="${PYTHON:-.venv/bin/python}"; else PY="${PYTHON:-python3}"; fi
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

log() { echo "[gpu_campaign +$(( $(date +%s) - START_S ))s] $*"; }

install_wheels() {  # install_wheels SITE: the carried wheels (device README: --no-index --no-deps --target)
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
    echo "mode: $MODE  commit: $COMMIT  date: $(date -u +%FT%TZ)  host: $(uname -a)"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    else
      echo "nvidia-smi: not available (no NVIDIA driver here)"
    fi
    "$PY" - <<'EOF'
import importlib.metadata as md, platform
print("python", platform.python_version())
for dist in ("torch", "transformers", "bitsandbytes", "hydra-core", "omegaconf", "antlr4-python3-runtime", "peft",
             "triton", "nvidia-ml-py", "pandas", "numpy"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} (not installed)")
EOF
  } >"$1" 2>&1
  log "environment recorded in $1"
}

campaign() {  # campaign PRESET RESULTS OUT BUDGET: the one Python call; its last line is the summary
  "$PY" -m lorabench.campaign --preset "$1" --results "$2" --out "$3" --budget-s "$4" --started-at "$START_S"
}

provenance() {  # provenance OUT STATUS: read by collect (fills env.git_commit on records from a copy without git)
  printf '{"mode": "%s", "commit": "%s", "status": "%s", "seconds": %d}\n' \
    "$MODE" "$COMMIT" "$2" $(( $(date +%s) - START_S )) >"$1/provenance.json"
}

collect() {  # collect SRC RESULTS: union-merge the returned records into RESULTS, unknown commits filled in
  "$PY" - "$1" "$2" <<'EOF'
import json, pathlib, sys
src, results = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
commits = {json.loads(p.read_text()).get("commit") for p in src.glob("provenance*.json")} - {"", None, "unknown"}
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
campaign = results / "gpu-campaign"  # environment, provenance, log and the perf result, committed beside the records
for extra in [*src.glob("env*.txt"), *src.glob("provenance*.json"), *src.glob("bench_qlora.json"), *src.glob("*.log")]:
    campaign.mkdir(parents=True, exist_ok=True)
    (campaign / extra.name).write_bytes(extra.read_bytes())
    print(f"{campaign / extra.name}: copied")
EOF
}

run_gpu() {
  [[ -n "${OUT:-}" ]] || { echo "gpu_campaign: \$OUT is unset (run it through the device tool)" >&2; return 2; }
  mkdir -p "$OUT"
  install_wheels /tmp/site || { provenance "$OUT" "wheels failed"; return 1; }
  record_env "$OUT/env.txt"
  campaign gpu-campaign "$ROOT/results" "$OUT" "${BUDGET_S:-510}"
  local rc=$?
  provenance "$OUT" "rc=$rc"
  return "$rc"
}

dry_run() {  # the same pipeline on the CPU into a scratch folder under /tmp, then collect, calibrate, report
  local dir="${DRY_RUN_DIR:-/tmp/lorabench-dry-run}" rc summary
  [[ "$dir" == /tmp/?* ]] || { echo "gpu_campaign: DRY_RUN_DIR must be under /tmp" >&2; return 2; }
  rm -rf "$dir"
  mkdir -p "$dir/out"
  OUT="$dir/out"
  install_wheels "$dir/site" || return 1
  record_env "$OUT/env.txt"
  campaign gpu-campaign-dry "$dir/device-results" "$OUT" "${DRY_BUDGET_S:-150}" | tee "$dir/campaign.log"
  rc=${PIPESTATUS[0]}
  summary="$(tail -n 1 "$dir/campaign.log")"
  provenance "$OUT" "rc=$rc"
  ((rc == 0)) || { log "campaign failed (exit $rc)"; echo "$summary"; return "$rc"; }
  collect "$OUT" "$dir/results" || return 1
  "$PY" -m lorabench.cli calibrate --records "$dir/results/gpu-validate/records.jsonl" \
    "$dir/results/gpu-probes/records.jsonl" --out "$dir/calibration.yaml"
  rc=$?
  if ((rc == 2)); then log "calibrate refused as it must (exit 2: no cuda records)"
  else log "ERROR: calibrate exited $rc on CPU records (expected 2)"; echo "$summary"; return 1; fi
  for sweep in gpu-validate gpu-probes; do
    "$PY" -m lorabench.cli report "$dir/results/$sweep" --out "$dir/reports/$sweep" >/dev/null \
      || { log "ERROR: lorabench report failed on $sweep"; echo "$summary"; return 1; }
  done
  log "dry run done: records in $dir/results, reports in $dir/reports, device files in $OUT"
  echo "$summary"
}

[[ -n "$COMMIT" ]] || COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
export LORABENCH_GIT_COMMIT="$COMMIT"
case "$MODE" in
  run) [[ -n "${OUT:-}" ]] || { echo "gpu_campaign: \$OUT is unset (run it through the device tool)" >&2; exit 2; }
       mkdir -p "$OUT"
       run_gpu 2>&1 | tee "$OUT/campaign.log"; exit "${PIPESTATUS[0]}" ;;
  dry-run) dry_run; exit $? ;;
  collect)
    [[ -d "$COLLECT_DIR" ]] || { echo "gpu_campaign: collect needs the reply's files_at folder" >&2; exit 2; }
    collect "$COLLECT_DIR" "$ROOT/results"; exit $? ;;
  *) echo "usage: bash scripts/gpu_campaign.sh run [--commit SHA] | dry-run | collect DIR" >&2; exit 2 ;;
esac
