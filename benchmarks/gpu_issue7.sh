#!/usr/bin/env bash
# The remaining GPU measurements of issue 7, in priority order, inside one device-time budget:
#   bench_core  cifar10 preset, batch 128, dense and 50% ticket in seven modes: eager fp32 (the
#               reference stack); bf16 (the fast path without compilation); graph (bf16, eager kernels,
#               the whole step as one CUDA graph: nothing to compile); fast (the trainer's GPU default);
#               fast-nograph (compiled without CUDA graphs); fast-graph (compiled, whole-step graph);
#               fast-nobench (without cuDNN autotuning). Each row is profiled: GPU busy share, kernels
#               per step, time by kernel kind, top kernels. This says where the step time goes. The
#               compiled modes after `fast` compile the same graph; inductor's on-disk cache may
#               shorten that (each row prints its warm-up). The JSON is rewritten after every row.
#   bench_rest  the 30% / 80% tickets and the TA-EB region tickets (configs/cifar10_taeb.yaml), eager,
#               graph and fast.
#   curves      fast path vs fp32 eager loss curves, 2,000 Fashion-MNIST iterations (fmnist preset).
#   sample      sampling images/s of the fast-path run: fp32, bf16, bf16 + compile(reduce-overhead).
# A stage is skipped when less than its minimum is left of DEADLINE seconds (default 560: one call).
# Two calls on one warm machine: STAGES="bench_core bench_rest" then STAGES="curves sample".
# Expects .whl/ (diffusers, torch-pruning wheels) and .devdata/fmnist/ carried (benchmarks/README.md, section 6).
set -u
TQDM_MININTERVAL=30
. benchmarks/gpu_common.sh
STAGES=${STAGES:-bench_core bench_rest curves sample}
DEADLINE=${DEADLINE:-560}
T0=$(date +%s)
# run_if NAME MIN LIMIT CMD...: run a stage with min(LIMIT, time left) when at least MIN seconds are left
run_if() { local name=$1 min=$2 limit=$3; shift 3
  case " $STAGES " in *" ${name%%_*} "*|*" $name "*) ;; *) return 0 ;; esac
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  if [ "$left" -lt "$min" ]; then echo "=== $name skipped: ${left}s left, needs ${min}s ==="; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  stage "$name" "$limit" "$@"; }
B="$E bench --preset cifar10 --batch 128 --steps 50 --warmup 15"
run_if bench_core 200 360 $B --ratios 0,0.5 --modes eager,bf16,graph,fast,fast-nograph,fast-graph,fast-nobench \
  --profile 10 --json "$OUT/bench_core.json"
run_if bench_rest 150 300 $B --ratios 0,0.3,0.8 --taeb configs/cifar10_taeb.yaml --modes eager,graph,fast \
  --json "$OUT/bench_rest.json"
FM="data.root=.devdata/fmnist train.progress=false train.iters=2000 train.log_every=50 train.ckpt_every=2000"
run_if curves_fp32 100 150 $E train --config configs/fmnist.yaml $FM train.mixed_precision=no \
  train.compile=none train.channels_last=false train.fused_optimizer=false train.cudnn_benchmark=false --out /tmp/runs/fp32
run_if curves_fast 140 200 $E train --config configs/fmnist.yaml $FM --out /tmp/runs/fast
if [ -f /tmp/runs/fp32/metrics.jsonl ] && [ -f /tmp/runs/fast/metrics.jsonl ]; then python3 - "$OUT" <<'PY'
import json, sys
def curve(p):
    return {r["iter"]: r["loss"] for r in map(json.loads, open(p)) if "loss" in r}
a, b = curve("/tmp/runs/fp32/metrics.jsonl"), curve("/tmp/runs/fast/metrics.jsonl")
common = sorted(set(a) & set(b))
rel = [abs(a[i] - b[i]) / a[i] for i in common]
late = [r for i, r in zip(common, rel) if i > 500]
res = {"iters": common, "fp32": [a[i] for i in common], "fast": [b[i] for i in common],
       "max_rel_diff": max(rel) if rel else None, "mean_rel_diff": sum(rel) / len(rel) if rel else None,
       "mean_rel_diff_after_500": sum(late) / len(late) if late else None}
json.dump(res, open(sys.argv[1] + "/loss_curves_fp32_vs_fast.json", "w"), indent=1)
print({k: v for k, v in res.items() if "diff" in k})
PY
fi
S="$E sample /tmp/runs/fast --n 2000 --steps 100 --batch-size 500"
run_if sample_fp32 30 90 $S --precision no --compile none --out /tmp/samples/fp32.png
run_if sample_bf16 30 90 $S --precision bf16 --compile none --out /tmp/samples/bf16.png
run_if sample_graph 90 180 $S --precision bf16 --compile reduce-overhead --out /tmp/samples/graph.png
for r in fp32 fast; do cp /tmp/runs/$r/summary.json "$OUT/summary_$r.json" 2>/dev/null; done
cp /tmp/samples/*.png "$OUT/" 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"
# at most 8 files come back: the JSON results stay loose, logs, summaries and grids go into one archive
(cd "$OUT" && tar czf extras.tgz --remove-files $(ls | grep -v -e '^bench_.*json$' -e '^loss_curves' -e '^gpu.txt$') \
  && ls -la)
