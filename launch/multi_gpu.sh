#!/usr/bin/env bash
# Search (or retrain) on every GPU of one machine with MirroredStrategy.
# The global batch in the config is split across the GPUs; scale it (and the learning
# rate) with the number of GPUs if you want the per-GPU batch of the paper.
#
#   launch/multi_gpu.sh search --config=configs/cifar.py --workdir=/tmp/search
#   launch/multi_gpu.sh train --config=configs/cifar_train.py --config.genotype=/tmp/search/genotype.json --workdir=/tmp/train
#   CUDA_VISIBLE_DEVICES=0,1 launch/multi_gpu.sh search ...      # a subset of the GPUs
set -euo pipefail
binary=${1:?usage: launch/multi_gpu.sh search|train --config=... --workdir=...}
shift
case "$binary" in
  search|train) ;;
  *) echo "unknown binary '$binary'; expected search or train" >&2; exit 2 ;;
esac
exec python -m "keras_das.$binary" "$@" --config.distribution.strategy=mirrored
