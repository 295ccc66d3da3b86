#!/usr/bin/env bash
# Split an assembled miniImageNet folder into parts small enough for the lent GPU machine (64 MiB of working tree a
# call), in the ignored folder .gpu-data/, and print the device calls that carry them and then train there.
# Usage: bash benchmarks/ship_miniimagenet.sh /path/to/miniimagenet [part size, default 60m]
set -euo pipefail
source=${1:?give the assembled miniImageNet folder (train/ val/ test/ of wnid folders)}
size=${2:-60m}
mkdir -p .gpu-data
rm -f .gpu-data/miniimagenet.part-*
tar cf - -C "$(dirname "$source")" "$(basename "$source")" | split -b "$size" - .gpu-data/miniimagenet.part-
echo "parts:"; ls -la .gpu-data/miniimagenet.part-*
echo
echo "carry each part in its own device call, close together so the machine stays warm, e.g.:"
for part in .gpu-data/miniimagenet.part-*; do echo "  run(carry=[\"$part\"], command=\"ls -la .gpu-data\")"; done
echo "then, in one call:"
echo "  cat .gpu-data/miniimagenet.part-* | tar xf - -C .gpu-data && export KSHOT_MINIIMAGENET=\$PWD/.gpu-data/$(basename "$source") \\"
echo "    && python -m kshot download miniimagenet && BUDGET=540 DEADLINE=570 TAG=gpu bash benchmarks/gpu_recipes.sh \\"
echo "    protonet-miniimagenet-1shot protonet-miniimagenet-5shot maml-miniimagenet-5way-1shot maml-miniimagenet-5way-5shot"
