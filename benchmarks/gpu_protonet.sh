#!/usr/bin/env bash
# Superseded by benchmarks/gpu_session.py (several recipes per call, resumed across calls); kept because earlier
# result rows name this command.
# The ProtoNet paper settings on one GPU, both models at once (used on a lent H100; see BENCHMARKS.md).
set -u
export KSHOT_DATA=${KSHOT_DATA:-$PWD/.kshot-cache} PYTHONUNBUFFERED=1
budget=${BUDGET:-420}
for recipe in protonet-omniglot-1shot protonet-omniglot-5shot; do
  python benchmarks/reproduce.py $recipe --device cuda --no-progress --set train.time_budget_s=$budget \
    > ${OUT:-/tmp}/$recipe.log 2>&1 &
done
wait
