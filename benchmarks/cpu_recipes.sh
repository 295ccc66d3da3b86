#!/usr/bin/env bash
# Train and evaluate recipes on the CPU, JOBS at a time (default: one per core), each on one thread with its own
# training-time budget, then copy each run's training log to benchmarks/results/logs/ and refresh BENCHMARKS.md.
# Usage: JOBS=2 BUDGET=480 TAG=cpu-budget [SETS="train.val_episodes=100"] \
#          bash benchmarks/cpu_recipes.sh recipe[:budget[:val_every[:steps]]] [...]
# A spec's steps caps train.steps, so that a schedule (Reptile's linear anneal) completes inside the budget.
# Runs start in the order given (put the most wanted first); with STOP_AT=HH:MM none starts after that time.
# Each run's output goes to runs/benchmarks/<run>.log.
set -u
export KSHOT_DATA=${KSHOT_DATA:-$PWD/.kshot-cache} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
jobs=${JOBS:-$(nproc)}
budget=${BUDGET:-480}
tag=${TAG:-cpu-budget}
sets=${SETS:-}
python=${PYTHON:-python}
stop_at=${STOP_AT:-}
mkdir -p runs/benchmarks benchmarks/results/logs
"$python" -c "from kshot.data.omniglot import omniglot; [omniglot(s, progress=False) for s in ('train', 'val', 'test')]"

run_one() {  # one spec: recipe[:budget[:val_every[:steps]]]
  local spec=$1 recipe seconds val_every steps args
  IFS=: read -r recipe seconds val_every steps <<< "$spec"
  if [ -n "$stop_at" ] && [ "$(date +%s)" -ge "$(date -d "$stop_at" +%s)" ]; then
    echo "$(date +%T) skip  $recipe (STOP_AT $stop_at passed)"
    return
  fi
  args=(--tag "$tag" --no-progress --set train.time_budget_s="${seconds:-$budget}")
  [ -n "${val_every:-}" ] && args+=(--set train.val_every="$val_every")
  [ -n "${steps:-}" ] && args+=(--set train.steps="$steps")
  for s in $sets; do args+=(--set "$s"); done
  echo "$(date +%T) start $recipe ${args[*]}"
  "$python" benchmarks/reproduce.py "$recipe" "${args[@]}" > "runs/benchmarks/$recipe-$tag.log" 2>&1
  echo "$(date +%T) done  $recipe (exit $?): $(grep -E 'way' "runs/benchmarks/$recipe-$tag.log" | tail -4 | tr '\n' ' ')"
  cp "runs/benchmarks/$recipe-$tag/metrics.jsonl" "benchmarks/results/logs/$recipe-$tag.metrics.jsonl" 2>/dev/null
}
export -f run_one
export budget tag sets python stop_at
printf '%s\n' "$@" | xargs -P "$jobs" -I{} bash -c 'run_one "$1"' _ {}
"$python" benchmarks/report.py
