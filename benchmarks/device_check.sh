#!/usr/bin/env bash
# The device check (benchmarks/device_check.py): the CUDA tests, bench_step on CUDA (bf16 +
# channels_last, eager and compiled, ResNet-110 and WRN-28-10 pairs, TFLOP/s and fraction of
# the GPU's peak), bench_data on CUDA, one epoch of dcm on real CIFAR-10 images, and a
# multi-GPU row when there is more than one GPU. Under 8 minutes; figures go to $OUT (or
# benchmarks/results) as device-<gpu>.json and .md.
#
#   python benchmarks/device_data.py            # here: a CIFAR-10 subset small enough to travel
#   bash benchmarks/device_check.sh --data-dir .device-data/cifar10     # on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/device_check.py "$@"
