#!/usr/bin/env bash
# Superseded by benchmarks/gpu_session.py (several recipes per call, resumed across calls); kept because earlier
# result rows name this command.
# Train and evaluate several recipes at once on one GPU, each with a training-time budget, and pack the results,
# training logs and best checkpoints into $OUT/results-<tag>.tgz.
# Usage: BUDGET=420 TAG=gpu [DEADLINE=560] bash benchmarks/gpu_recipes.sh recipe[:budget] [recipe[:budget] ...]
# A recipe may name its own training budget in seconds (recipe:300); DEADLINE (seconds) stops every run still going
# by then, so that the packing below always happens inside a call's time limit.
set -u
export KSHOT_DATA=${KSHOT_DATA:-$PWD/.kshot-cache} PYTHONUNBUFFERED=1
budget=${BUDGET:-420}
tag=${TAG:-gpu}
deadline=${DEADLINE:-100000}
out=${OUT:-/tmp}
logs=$(mktemp -d)  # run logs, packed below: a call returns only a few files
nvidia-cuda-mps-control -d 2>/dev/null && echo "MPS daemon started (concurrent kernels across processes)"
python -c "from kshot.data.omniglot import omniglot; [omniglot(s, progress=False) for s in ('train', 'val', 'test')]"
names=()
for spec in "$@"; do
  recipe=${spec%%:*}
  seconds=$budget
  [ "$spec" != "$recipe" ] && seconds=${spec#*:}
  names+=("$recipe")
  timeout "$deadline" python benchmarks/reproduce.py "$recipe" --device cuda --no-progress --tag "$tag" \
    --set train.time_budget_s="$seconds" > "$logs/$recipe-$tag.log" 2>&1 &
done
wait
mkdir -p benchmarks/results/logs
for recipe in "${names[@]}"; do
  cp "runs/benchmarks/$recipe-$tag/metrics.jsonl" "benchmarks/results/logs/$recipe-$tag.metrics.jsonl" 2>/dev/null
done
tar czf "$out/results-$tag.tgz" benchmarks/results runs/benchmarks/*-"$tag"/checkpoints/best \
  runs/benchmarks/*-"$tag"/results.json 2>/dev/null
tar czf "$out/logs-$tag.tgz" -C "$logs" .
cat "$logs"/*-"$tag".log | grep -E "way|Error|error" | tail -60
echo quit | nvidia-cuda-mps-control 2>/dev/null
