#!/usr/bin/env bash
# Issue 15 in one device call: quality over wall-clock training time on one GPU.
#   study       `ebdiff experiment configs/experiments/fmnist_quality_time_gpu.yaml --no-eval`: dense, EB 50%,
#               EB 30%, TA-EB 30/60/80 (branches at once on the GPU), prune+finetune 50%, each evaluated
#               during training (FD-FMNIST every 10 s of training), then the report (curves, time to
#               dense's final quality, speed-up at equal quality next to the paper's speed-up, grids)
#   final_eval  the same command with the final evaluation (eval.json, 2,000 samples at 50 steps), when at
#               least MIN_FINAL seconds of DEADLINE are left: finished runs are skipped, the report rewritten
#   report      only if the study was cut short: the report of the runs that finished
#   summary     benchmarks/gpu_issue15_summary.py -> summary.md: per method its time to dense's final
#               FD-FMNIST and the speed-ups, and the paper's claims in shape (EB 50% <= 1/2, TA-EB <= 1/4)
# DEADLINE (default 540 s = 9 minutes) bounds the whole script; every stage gets what is left of it.
# Expects .whl/ (diffusers, torch-pruning wheels) and .devdata/fmnist/ carried (benchmarks/README.md):
#   run(command="bash benchmarks/gpu_issue15.sh", carry=[".whl", ".devdata"], timeout_s=600)
# CPU dry run with small sizes (every command of the script; benchmarks/README.md, section 7):
#   OUT=/tmp/dry SCALE=0.05 FINAL_N=32 FINAL_STEPS=3 STUDY_EXTRA="model.preset=tiny train.device=cpu \
#     data.limit=512 train.eval_n=16 train.eval_steps=3" bash benchmarks/gpu_issue15.sh
set -u
. benchmarks/gpu_common.sh
DEADLINE=${DEADLINE:-540}
MIN_FINAL=${MIN_FINAL:-75}
T0=$(date +%s)
EXP=${EXP:-configs/experiments/fmnist_quality_time_gpu.yaml}
RUNS=${RUNS:-/tmp/runs/quality_time}
SCALE=${SCALE:-1}
export EBDIFF_CACHE=${EBDIFF_CACHE:-/tmp/ebdiff-cache}
X="$E experiment $EXP --out $RUNS --scale $SCALE"
SET="data.root=.devdata/fmnist ${STUDY_EXTRA:-}"
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
stage study $(( $(left) - 15 )) $X --no-eval $SET
if [ -f "$RUNS/experiment.json" ] && [ "$(left)" -ge "$MIN_FINAL" ]; then
  stage final_eval $(( $(left) - 10 )) $X ${FINAL_N:+--eval-n $FINAL_N} ${FINAL_STEPS:+--eval-steps $FINAL_STEPS} $SET
else
  echo "=== final_eval skipped: $(left) s left (needs $MIN_FINAL) or the study did not finish ==="
fi
if [ ! -f "$RUNS/experiment.json" ]; then  # cut short: report what finished
  DONE=$(for d in "$RUNS"/*/; do [ -f "$d/summary.json" ] || [ -f "$d/taeb.json" ] && echo "$d"; done)
  [ -n "$DONE" ] && stage report 60 $E report $DONE --out "$RUNS/report"
fi
python3 benchmarks/gpu_issue15_summary.py "$RUNS" --device "$(head -n 2 "$OUT/gpu.txt" | tail -n 1)" \
  --seconds $(( $(date +%s) - T0 )) | tee "$OUT/summary.md"
echo "total $(( $(date +%s) - T0 )) s"
# at most 8 files come back: summary.md, gpu.txt, the report, its two main figures loose; the rest in one archive
for f in report.md report.json quality_curves.png samples.png; do cp "$RUNS/report/$f" "$OUT/" 2>/dev/null; done
(cd "$RUNS" && tar czf "$OUT/extras.tgz" --exclude='checkpoints' --exclude='snapshots' --exclude='*.npz' \
  $(ls -d ./* 2>/dev/null) -C "$OUT" $(cd "$OUT" && ls ./*.log 2>/dev/null))
(cd "$OUT" && rm -f ./*.log && ls -la)
