#!/usr/bin/env bash
# The remaining GPU measurements of issue 7 as one command (device tool, ~12 min on an H200):
#   1. bench: cifar10 preset, batch 128, dense / 30% / 50% / 80% and the TA-EB region tickets (60%),
#      eager fp32 (the reference stack) and the fast path, with compile time reported apart;
#   2. fast path vs fp32 eager loss curves over 2,000 iterations on Fashion-MNIST (fmnist preset);
#   3. sampling images/s, fp32 vs bf16, on the fast-path run.
# Expects .whl/ (diffusers, torch-pruning wheels) and .devdata/fmnist/ carried (see benchmarks/README.md).
set -u
TQDM_MININTERVAL=30
. benchmarks/gpu_common.sh
stage bench ${BENCH_LIMIT:-420} $E bench --preset cifar10 --ratios 0,0.3,0.5,0.8 --taeb configs/cifar10_taeb.yaml \
  --batch 128 --steps 50 --warmup 15 --json "$OUT/bench_cifar10.json"
FM="data.root=.devdata/fmnist train.progress=false train.iters=2000 train.log_every=50 train.ckpt_every=2000"
stage curve_fp32 ${CURVE_LIMIT:-150} $E train --config configs/fmnist.yaml $FM train.mixed_precision=no \
  train.compile=none train.channels_last=false train.fused_optimizer=false --out /tmp/runs/fp32
stage curve_fast ${CURVE_LIMIT:-150} $E train --config configs/fmnist.yaml $FM --out /tmp/runs/fast
python3 - "$OUT" <<'PY'
import json, sys
def curve(p):
    return {r["iter"]: r["loss"] for r in map(json.loads, open(p)) if "loss" in r}
a, b = curve("/tmp/runs/fp32/metrics.jsonl"), curve("/tmp/runs/fast/metrics.jsonl")
common = sorted(set(a) & set(b))
rel = [abs(a[i] - b[i]) / a[i] for i in common]
res = {"iters": common, "fp32": [a[i] for i in common], "fast": [b[i] for i in common],
       "max_rel_diff": max(rel) if rel else None, "mean_rel_diff": sum(rel) / len(rel) if rel else None}
json.dump(res, open(sys.argv[1] + "/loss_curves_fp32_vs_fast.json", "w"), indent=1)
print({k: v for k, v in res.items() if "diff" in k})
PY
for p in no bf16; do
  stage sample_$p 60 $E sample /tmp/runs/fast --n 1000 --steps 100 --batch-size 500 --precision $p --out "$OUT/samples_$p.png"
done
for r in fp32 fast; do cp /tmp/runs/$r/summary.json "$OUT/summary_$r.json" 2>/dev/null; done
ls -la "$OUT"
