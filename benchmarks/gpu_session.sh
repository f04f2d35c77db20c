#!/usr/bin/env bash
# One prepared GPU session (device tool): foundation run, EB run and the throughput bench.
# Expects: .whl/ (diffusers, torch-pruning wheels) and .devdata/fmnist/ (the four IDX files) carried.
# Every stage has its own time limit so that a slow or failing stage cannot eat the others.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
else
  export PYTHONPATH=$PWD/src
fi
E="python3 -m ebdiff.cli"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, torch_pruning; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'tp', torch_pruning.__version__)" | tee -a "$OUT/gpu.txt"
FM="data.root=.devdata/fmnist train.progress=false"
stage() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s) ==="; local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?; tail -n 25 "$OUT/$name.log"
  echo "=== $name rc=$rc $(( $(date +%s) - t0 )) s ==="; }
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
