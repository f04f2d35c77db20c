#!/usr/bin/env bash
# One prepared GPU session (device tool): foundation run, EB run and the throughput bench.
# Expects: .whl/ (diffusers, torch-pruning wheels) and .devdata/fmnist/ (the four IDX files) carried.
# Every stage has its own time limit so that a slow or failing stage cannot eat the others.
set -u
TQDM_MININTERVAL=30
. benchmarks/gpu_common.sh
FM="data.root=.devdata/fmnist train.progress=false"
# 1. dense fmnist preset on Fashion-MNIST (issue 2): samples + it/s
stage dense ${DENSE_LIMIT:-170} $E train --config configs/fmnist.yaml $FM train.iters=${DENSE_ITERS:-5000} \
  train.ckpt_every=1000 train.log_every=500 --out /tmp/runs/fm-dense
stage dense_sample 40 $E sample /tmp/runs/fm-dense --n 64 --steps 100 --out "$OUT/fm_dense_samples.png"
cp /tmp/runs/fm-dense/metrics.jsonl "$OUT/fm_dense_metrics.jsonl" 2>/dev/null
cp /tmp/runs/fm-dense/summary.json "$OUT/fm_dense_summary.json" 2>/dev/null
# 3. throughput bench (issue 7)
stage bench ${BENCH_LIMIT:-170} $E bench --preset cifar10 --ratios ${BENCH_RATIOS:-0,0.5,0.3} --batch 128 \
  --steps 50 --warmup 15 --json "$OUT/bench_cifar10.json"
# 2. EB-Diff-Train 50% on the same budget (issue 3)
stage eb ${EB_LIMIT:-150} $E train --config configs/fmnist.yaml $FM train.iters=${DENSE_ITERS:-5000} \
  train.ckpt_every=1000 train.log_every=500 early_bird.ratio=0.5 early_bird.check_every=100 --out /tmp/runs/fm-eb50
stage eb_sample 40 $E sample /tmp/runs/fm-eb50 --n 64 --steps 100 --out "$OUT/fm_eb50_samples.png"
cp /tmp/runs/fm-eb50/summary.json "$OUT/fm_eb50_summary.json" 2>/dev/null
cp /tmp/runs/fm-eb50/hamming.png "$OUT/fm_eb50_hamming.png" 2>/dev/null
ls -la "$OUT"
