#!/usr/bin/env bash
# CPU step-time validation runs: three model sizes x six methods x checkpointing, repeated REPEATS times,
# single-threaded, into results/cpu-time/records.jsonl (run from a clean checkout so records say so).
#   bash scripts/cpu_time_sweep.sh 3
set -euo pipefail
REPEATS=${1:-3}
PY=${PY:-.venv/bin/python}
small=""
medium="model.hf_config.hidden_size=256 model.hf_config.intermediate_size=688 model.hf_config.num_hidden_layers=4 model.hf_config.num_attention_heads=8 model.hf_config.num_key_value_heads=4 model.hf_config.vocab_size=2048"
large="model.hf_config.hidden_size=768 model.hf_config.intermediate_size=2048 model.hf_config.num_hidden_layers=6 model.hf_config.num_attention_heads=12 model.hf_config.num_key_value_heads=4 model.hf_config.vocab_size=8192"
for rep in $(seq 1 "$REPEATS"); do
  for size in small medium large; do
    # shellcheck disable=SC2086
    "$PY" -m lorabench.sweep -m sweep=cpu-time ${!size} seed="$rep"
  done
done
