#!/usr/bin/env bash
# Superseded by benchmarks/gpu_session.py (several recipes per call, resumed across calls); kept because earlier
# result rows name this command.
# Matching (with and without FCE), Relation, Siamese (BCE and contrastive), Baseline, Baseline++ and SimpleShot on
# Omniglot, all at once on one GPU (about 8 minutes on an H100), then the comparison on identical test episodes.
# Budgets: BUDGET seconds of training for the episodic learners, BASELINE_BUDGET for the supervised ones (their
# test-time head fitting makes evaluation longer). Set COMPARE=0 to skip the comparison (a few more minutes).
set -u
export KSHOT_DATA=${KSHOT_DATA:-$PWD/.kshot-cache} PYTHONUNBUFFERED=1
budget=${BUDGET:-330}
baseline_budget=${BASELINE_BUDGET:-270}
tag=${TAG:-gpu}
logs=${OUT:-/tmp}
python -c "from kshot.data.omniglot import omniglot; [omniglot(s, progress=False) for s in ('train', 'val', 'test')]"
episodic="matching-omniglot-1shot matching-omniglot-5shot matching-fce-omniglot-1shot matching-fce-omniglot-5shot
  relation-omniglot-1shot relation-omniglot-5shot siamese-omniglot-1shot siamese-contrastive-omniglot-1shot"
supervised="baseline-omniglot baselinepp-omniglot simpleshot-omniglot"
for recipe in $episodic; do
  python benchmarks/reproduce.py $recipe --device cuda --no-progress --tag $tag \
    --set train.time_budget_s=$budget > $logs/$recipe-$tag.log 2>&1 &
done
for recipe in $supervised; do
  python benchmarks/reproduce.py $recipe --device cuda --no-progress --tag $tag \
    --set train.time_budget_s=$baseline_budget > $logs/$recipe-$tag.log 2>&1 &
done
wait
python benchmarks/report.py
if [ "${COMPARE:-1}" = 1 ]; then
  runs=""
  for recipe in $episodic $supervised; do runs="$runs runs/benchmarks/$recipe-$tag"; done
  python benchmarks/compare.py $runs --device cuda --episodes 1000 --tag omniglot-$tag --no-progress
fi
