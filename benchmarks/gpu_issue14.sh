#!/usr/bin/env bash
# Issue 14's GPU measurement: one device call (DEADLINE seconds, default 540), stages in priority order,
# each with its own time limit (a stage that no longer fits is skipped and says so).
#   bench_core     cifar10 preset, batch 128, dense and 50% ticket in the fast path (today's GPU default:
#                  bf16 + channels_last + compile reduce-overhead), each row profiled (busy share, time by
#                  kernel kind) with its model FLOP/s and MFU
#   compile_again  the dense shape bench_core compiled, compiled again in fresh processes: with the cache
#                  folder kept (inductor's folder) and with only the portable artifacts (a fresh machine)
#   graph_eb       the trainer's own path with train.cuda_graph=true (eager kernels, nothing to compile):
#                  Fashion-MNIST, fmnist preset, an Early-Bird ticket at 50% and its recapture (the
#                  command that crashed on the H200 with cudaErrorStreamCaptureImplicit)
#   auto_eb        train.compile=auto through an Early-Bird extraction: one decision line per model shape
#   bench_layout   dense, profiled: fast-nograph (the same compiled step without CUDA graphs, so that the
#                  profiler can name the operator that launched each copy) and fast-layout (fast with
#                  inductor's channels-last layout optimisation forced, train.layout_opt)
#   bench_rest     eager fp32 and fast on dense, 30%, 50% and 80%, profiled: all targets' rows in one call
#   curves         Fashion-MNIST loss curves: fp32 eager vs the fast path (bf16 + compile), judged against
#                  the seed-to-seed floor of two fast-path runs (benchmarks/loss_curves.py)
#   bench_dit      issue 23's DiT rows: dit-s2-cifar10 (pixels) and dit-b2-imagenet256 (latent 4x32x32), dense,
#                  30% and 50% tickets, batch 128 and 32, eager fp32 and bf16 (nothing to compile: no cold
#                  compile eats the stage), with model FLOP/s and MFU (attention products not counted)
#   bench_round    the 30% and 80% tickets with channels rounded to multiples of 8 (early_bird.round_channels)
#   bench_more     fast-nocl (compiled in NCHW), graph, fast-graph, fast-graph-layout on dense and 50%
# A cold compile costs ~90 s per shape and mode, so a first call gets through about bench_layout. Its
# compile cache comes back as ccache.tgz: carried into the next call as .ccache/ (benchmarks/README.md),
# every shape compiled before costs seconds; the second call then holds all targets' rows (bench_rest),
# a third the rest. Name the same GPU kind in every call (the cache is per GPU model).
# Expects .whl/ (diffusers, torch-pruning wheels) and .devdata/fmnist/ carried, .ccache/ when continuing.
# CPU dry run (every stage, small sizes): see benchmarks/README.md, section 7.
set -u
TQDM_MININTERVAL=30
STAGES=${STAGES:-bench_core compile_again graph_eb auto_eb bench_layout bench_rest curves bench_dit bench_round bench_more}
DEADLINE=${DEADLINE:-540}
. benchmarks/gpu_common.sh
export EBDIFF_COMPILE_CACHE=${EBDIFF_COMPILE_CACHE:-$PWD/.ccache}
R=/tmp/ebdiff_issue14_runs; rm -rf $R  # this script's run folders (a run folder that exists is resumed or refused)
mkdir -p "$EBDIFF_COMPILE_CACHE"
FMROOT=${FMROOT:-.devdata/fmnist}
if [ "${DRY:-0}" = 1 ]; then  # the CPU: tiny sizes, the CPU's modes, no CUDA graph
  B="$E bench --preset tiny --batch 4 --steps 2 --warmup 1 --device cpu"
  PROF=1; CORE=compiled; LAYOUT=compiled,compiled-layout; REST=eager,cl; FASTMODE=compiled; ROUNDMODE=cl; MORE=cl
  PAIR=0  # one compiled shape per compiled stage: a CPU compile costs minutes
  FM="model.preset=tiny data.limit=256 train.batch_size=8 train.iters=60 train.log_every=5 train.device=cpu"
  ITERS=60; AFTER=20; CHECK=5; MAXS_G=30; MAXS_A=30; GRAPH="train.cuda_graph=false"
  FASTCURVE="train.channels_last=true"  # a CPU compile of one more shape costs minutes: the runs' plumbing only
  DIT="--steps 1 --warmup 1 --device cpu"; DITB="2"; DITMODES=eager; DIT_S2=dit-tiny; DIT_B2=dit-latent-tiny
  FP32="train.mixed_precision=no train.compile=none"
else
  B="$E bench --preset cifar10 --batch 128 --steps 40 --warmup 10"
  PAIR=0,0.5
  PROF=5; CORE=fast; LAYOUT=fast-nograph,fast-layout; REST=eager,fast; FASTMODE=fast; ROUNDMODE=fast; MORE=fast-nocl,graph,fast-graph,fast-graph-layout
  FM="" ITERS=1000 AFTER=300 CHECK=50 MAXS_G=800 MAXS_A=250; GRAPH="train.cuda_graph=true train.compile=none"
  FASTCURVE="train.compile=reduce-overhead"
  DIT="--steps 20 --warmup 5"; DITB="128 32"; DITMODES=eager,bf16; DIT_S2=dit-s2-cifar10; DIT_B2=dit-b2-imagenet256
  FP32="train.mixed_precision=no train.compile=none train.channels_last=false train.fused_optimizer=false train.cudnn_benchmark=false"
fi
T="$E train --config configs/fmnist.yaml data.root=$FMROOT train.progress=false train.log_every=50 train.ckpt_every=100000"
EB="early_bird.ratio=0.5 early_bird.check_every=$CHECK early_bird.on_miss=extract-anyway"
# 1. the targets' core rows, profiled
run_if bench_core 150 330 $B --ratios $PAIR --modes $CORE --profile $PROF --json "$OUT/bench_core.json"
# 2. the dense shape bench_core compiled, compiled again in fresh processes: the folder kept / artifacts only
run_if compile_again_kept 30 60 $B --ratios 0 --modes $FASTMODE --json "$OUT/compile_kept.json"
ART=/tmp/ccache_artifacts_only; rm -rf $ART; mkdir -p $ART
cp -r "$EBDIFF_COMPILE_CACHE/artifacts" "$EBDIFF_COMPILE_CACHE/timings" $ART/ 2>/dev/null
run_if compile_again_artifacts 30 60 env EBDIFF_COMPILE_CACHE=$ART $B --ratios 0 --modes $FASTMODE \
  --json "$OUT/compile_artifacts.json"
# 3. the crash of issue 14, item 5: whole-step graph + Early-Bird extraction + recapture (the fmnist config
#    warms its EMA up, which a captured step cannot: ema_warmup=false); a ticket by MAXS_G at the latest
run_if graph_eb 60 150 $T train.iters=1200 $GRAPH train.ema_warmup=false $EB early_bird.max_search_iters=$MAXS_G \
  $FM --out $R/graph_eb
# 4. train.compile=auto on the trainer's path: the dense model and the ticket each decide (printed, logged)
run_if auto_eb 40 120 $T train.iters=400 train.compile=auto $EB early_bird.max_search_iters=$MAXS_A $FM \
  --out $R/auto_eb
# 5. who launches the copies (without CUDA graphs the profiler sees the launching operators), and the forced
#    layout optimisation against them
run_if bench_layout 100 250 $B --ratios 0 --modes $LAYOUT --profile $PROF --json "$OUT/bench_layout.json"
# 6. the other tickets
run_if bench_rest 120 300 $B --ratios 0,0.3,0.5,0.8 --modes $REST --profile $PROF --json "$OUT/bench_rest.json"
# 7. loss curves: fp32 eager vs the fast path, seed-to-seed floor from the fast path twice
C="train.iters=$ITERS $FM"
run_if curves_fp32 60 150 $T $C $FP32 --out $R/fp32
run_if curves_fast 60 180 $T $C $FASTCURVE --out $R/fast
run_if curves_fast_seed2 40 100 $T $C $FASTCURVE train.seed=1235 --out $R/fast_seed2
[ -f $R/fp32/metrics.jsonl ] && [ -f $R/fast/metrics.jsonl ] && [ -f $R/fast_seed2/metrics.jsonl ] && \
  python3 benchmarks/loss_curves.py $R/fp32 $R/fast --noise $R/fast $R/fast_seed2 \
    --after $AFTER --json "$OUT/loss_curves.json" | tee "$OUT/loss_curves.log"
# 8. DiT tickets (issue 23): pixel S/2 and latent B/2, both batch sizes, eager modes only (no compile)
for b in $DITB; do
  run_if bench_dit_s2_b$b 30 90 $E bench --preset $DIT_S2 --batch $b $DIT --ratios 0,0.3,0.5 --modes $DITMODES \
    --json "$OUT/bench_dit_s2_b$b.json"
  run_if bench_dit_b2_b$b 30 90 $E bench --preset $DIT_B2 --batch $b $DIT --ratios 0,0.3,0.5 --modes $DITMODES \
    --json "$OUT/bench_dit_b2_b$b.json"
done
# 9. channels rounded for the tensor cores; 10. the remaining modes
run_if bench_round 80 200 $B --ratios 0,0.3,0.8 --round 8 --modes $ROUNDMODE --profile $PROF --json "$OUT/bench_round.json"
run_if bench_more 80 300 $B --ratios $PAIR --modes $MORE --profile $PROF --json "$OUT/bench_more.json"
for r in graph_eb auto_eb fp32 fast fast_seed2; do
  cp $R/$r/summary.json "$OUT/summary_$r.json" 2>/dev/null
  cp $R/$r/ticket.json "$OUT/ticket_$r.json" 2>/dev/null
  cp $R/$r/metrics.jsonl "$OUT/metrics_$r.jsonl" 2>/dev/null
done
python3 benchmarks/gpu_issue14_summary.py "$OUT" | tee "$OUT/summary.md"
echo "total $(( $(date +%s) - T0 )) s"
# what comes back: summary.md, gpu.txt, results.tgz (JSON, logs, run summaries) and ccache.tgz (the portable
# compile cache: artifacts + timings, to carry into the next call as .ccache/)
(cd "$EBDIFF_COMPILE_CACHE" && tar czf "$OUT/ccache.tgz" artifacts timings 2>/dev/null)
(cd "$OUT" && tar czf results.tgz --remove-files $(ls | grep -v -e '^summary.md$' -e '^gpu.txt$' -e '^ccache.tgz$' \
  -e '^results.tgz$') && ls -la)
