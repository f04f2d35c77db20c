#!/usr/bin/env bash
# Demo-scale comparison on the CPU (issues 3, 4, 5): dense vs EB 50% vs TA-EB (30/60/80) on Fashion-MNIST
# with the tiny preset and the same iteration budget, the FD-FMNIST classifier (accuracy, floor) and
# FD-FMNIST/KID of every run at the same sample count, then the report. Optional: the CIFAR-10 classifier.
set -euo pipefail
cd "$(dirname "$0")/.."
E=.venv/bin/ebdiff
R=${RUNS:-runs/bench}
N=${N:-1000}
OUTD=benchmarks/results/eval_fmnist_cpu
mkdir -p "$R" "$OUTD"
[ -f "$R/demo-eb/summary.json" ] || $E train --config configs/demo.yaml --out "$R/demo-eb" train.iters=1500 train.progress=false
[ -f "$R/demo-dense/summary.json" ] || $E train --config configs/demo.yaml early_bird.ratio=null --out "$R/demo-dense" train.iters=1500 train.progress=false
[ -f "$R/demo-taeb/taeb.json" ] || $E ta-eb --config configs/demo_taeb.yaml --out "$R/demo-taeb" train.iters=1500
.venv/bin/python benchmarks/classifier_floor.py --dataset fashion-mnist --out "$OUTD/fmnist_classifier.json"
for run in demo-dense demo-eb demo-taeb; do
  $E eval "$R/$run" --n "$N" --steps 50
  $E sample "$R/$run" --n 64 --steps 50
  cp "$R/$run/eval.json" "$OUTD/eval_$run.json"
done
cp "$R/demo-taeb/taeb.json" "$R/demo-taeb/hamming_regions.png" "$OUTD/"
$E report "$R/demo-dense" "$R/demo-eb" "$R/demo-taeb" --out "$OUTD"
if [ -f ../shared/data/cifar10-jpeg.tar.gz ] && [ "${CIFAR:-0}" = 1 ]; then
  mkdir -p /tmp/cifar10 && { [ -d /tmp/cifar10/cifar10-jpeg ] || tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10; }
  .venv/bin/python benchmarks/classifier_floor.py --dataset cifar10 --root /tmp/cifar10 --epochs "${CIFAR_EPOCHS:-6}" \
    --out "$OUTD/cifar10_classifier.json"
fi
