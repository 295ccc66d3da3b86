#!/usr/bin/env bash
# Train and evaluate several recipes at once on one GPU, each with a training-time budget, and pack the results,
# training logs and best checkpoints into $OUT/results-<tag>.tgz.
# Usage: BUDGET=420 TAG=gpu bash benchmarks/gpu_recipes.sh recipe [recipe ...]
set -u
export KSHOT_DATA=${KSHOT_DATA:-$PWD/.kshot-cache} PYTHONUNBUFFERED=1
budget=${BUDGET:-420}
tag=${TAG:-gpu}
out=${OUT:-/tmp}
nvidia-cuda-mps-control -d 2>/dev/null && echo "MPS daemon started (concurrent kernels across processes)"
python -c "from kshot.data.omniglot import omniglot; [omniglot(s, progress=False) for s in ('train', 'val', 'test')]"
for recipe in "$@"; do
  python benchmarks/reproduce.py "$recipe" --device cuda --no-progress --tag "$tag" \
    --set train.time_budget_s="$budget" > "$out/$recipe-$tag.log" 2>&1 &
done
wait
mkdir -p benchmarks/results/logs
for recipe in "$@"; do
  cp "runs/benchmarks/$recipe-$tag/metrics.jsonl" "benchmarks/results/logs/$recipe-$tag.metrics.jsonl" 2>/dev/null
done
tar czf "$out/results-$tag.tgz" benchmarks/results runs/benchmarks/*-"$tag"/checkpoints/best \
  runs/benchmarks/*-"$tag"/results.json 2>/dev/null
cat "$out"/*-"$tag".log | grep -E "way|Error|error" | tail -60
echo quit | nvidia-cuda-mps-control 2>/dev/null
