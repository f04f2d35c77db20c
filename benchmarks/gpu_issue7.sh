#!/usr/bin/env bash
# The remaining GPU measurements of issue 7, in priority order, inside one device-time budget:
#   bench_core  cifar10 preset, batch 128, dense and 50% ticket in eight modes: eager fp32 (the
#               reference stack); bf16 (the fast path without compilation); graph (bf16, eager kernels,
#               the whole step as one CUDA graph: nothing to compile) and graph-nocl (the same in NCHW,
#               since eager GroupNorm copies channels_last input); fast (the trainer's GPU default);
#               fast-nograph (compiled without CUDA graphs); fast-graph (compiled, whole-step graph);
#               fast-nobench (without cuDNN autotuning). Each row is profiled: GPU busy share, kernels
#               per step, time by kernel kind, top kernels. This says where the step time goes. The
#               compiled modes after `fast` compile the same graph; inductor's on-disk cache may
#               shorten that (each row prints its warm-up). The JSON is rewritten after every row.
#   bench_rest  the 30% / 80% tickets and the TA-EB region tickets (configs/cifar10_taeb.yaml), eager,
#               graph and fast.
#   curves      fast path and whole-step graph vs fp32 eager loss curves, 2,000 Fashion-MNIST iterations
#               (fmnist preset), judged against the noise floor of a second seed of the fast path
#               (benchmarks/loss_curves.py), and the whole-step graph through an Early-Bird ticket extraction.
#   sample      sampling images/s of the fast-path run: fp32, bf16, bf16 + compile(reduce-overhead).
# A stage is skipped when less than its minimum is left of DEADLINE seconds (default 560: one call).
# Two calls on one warm machine: STAGES="bench_core bench_rest" then STAGES="curves sample".
# FM_EXTRA: overrides appended to the curves runs (a CPU dry run of the curves stage:
#   STAGES=curves FM_EXTRA="model.preset=tiny data.root=/usr/share/datasets/fashion-mnist train.iters=600 ..." ).
# Expects .whl/ (diffusers, torch-pruning wheels) and .devdata/fmnist/ carried (benchmarks/README.md, section 6).
set -u
TQDM_MININTERVAL=30
STAGES=${STAGES:-bench_core bench_rest curves sample}
. benchmarks/gpu_common.sh
B="$E bench --preset cifar10 --batch 128 --steps 50 --warmup 15"
run_if bench_core 200 360 $B --ratios 0,0.5 --modes eager,bf16,graph,graph-nocl,fast,fast-nograph,fast-graph,fast-nobench \
  --profile 10 --json "$OUT/bench_core.json"
run_if bench_rest 150 300 $B --ratios 0,0.3,0.8 --taeb configs/cifar10_taeb.yaml --modes eager,graph,fast \
  --json "$OUT/bench_rest.json"
FM="data.root=.devdata/fmnist train.progress=false train.iters=2000 train.log_every=50 train.ckpt_every=2000 ${FM_EXTRA:-}"
run_if curves_fp32 100 150 $E train --config configs/fmnist.yaml $FM train.mixed_precision=no \
  train.compile=none train.channels_last=false train.fused_optimizer=false train.cudnn_benchmark=false --out /tmp/runs/fp32
run_if curves_fast 140 200 $E train --config configs/fmnist.yaml $FM --out /tmp/runs/fast
# the noise floor for "within bf16 noise": the fast path again with another seed (its compiled shapes are cached)
run_if curves_fast_seed2 60 120 $E train --config configs/fmnist.yaml $FM train.seed=1235 --out /tmp/runs/fast_seed2
# configs/fmnist.yaml warms its EMA up; a captured step has one fixed EMA decay (train.cuda_graph's check)
G="train.cuda_graph=true train.compile=none train.ema_warmup=false"
run_if curves_graph 60 120 $E train --config configs/fmnist.yaml $FM $G --out /tmp/runs/graph
# the whole-step graph through an Early-Bird extraction (a second capture for the ticket)
run_if curves_graph_eb 60 120 $E train --config configs/fmnist.yaml $FM train.iters=1000 $G \
  early_bird.ratio=0.5 early_bird.check_every=100 --out /tmp/runs/graph_eb
[ -d /tmp/runs/fp32 ] && [ -d /tmp/runs/fast ] && [ -d /tmp/runs/fast_seed2 ] && \
  python3 benchmarks/loss_curves.py /tmp/runs/fp32 /tmp/runs/fast /tmp/runs/graph --noise /tmp/runs/fast \
    /tmp/runs/fast_seed2 --json "$OUT/loss_curves.json"
S="$E sample /tmp/runs/fast --n 2000 --steps 100 --batch-size 500"
run_if sample_fp32 30 90 $S --precision no --compile none --out /tmp/samples/fp32.png
run_if sample_bf16 30 90 $S --precision bf16 --compile none --out /tmp/samples/bf16.png
run_if sample_compiled 90 180 $S --precision bf16 --compile reduce-overhead --out /tmp/samples/compiled.png
for r in fp32 fast fast_seed2 graph graph_eb; do cp /tmp/runs/$r/summary.json "$OUT/summary_$r.json" 2>/dev/null; done
cp /tmp/runs/graph_eb/ticket.json "$OUT/ticket_graph_eb.json" 2>/dev/null
cp /tmp/samples/*.png "$OUT/" 2>/dev/null
J=$(ls "$OUT"/bench_core.json "$OUT"/bench_rest.json 2>/dev/null)
C=$(ls "$OUT"/loss_curves.json 2>/dev/null)
[ -n "$J" ] && python3 benchmarks/gpu_issue7_summary.py $J ${C:+--curves $C} | tee "$OUT/summary.md"
echo "total $(( $(date +%s) - T0 )) s"
# at most 8 files come back: the JSON results and summary.md stay loose, logs, run summaries and
# grids go into one archive
(cd "$OUT" && tar czf extras.tgz --remove-files $(ls | grep -v -e '^bench_.*json$' -e '^loss_curves' -e '^gpu.txt$' -e '^summary.md$') \
  && ls -la)
