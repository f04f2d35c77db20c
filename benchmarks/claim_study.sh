#!/usr/bin/env bash
# The claim study of issue 25 on one CPU core: the budget ladder (fmnist_claim_cpu: dense, EB 50%, Scratch 50%,
# prune+finetune 50% with 3 seeds, TA-EB 30/60/80), the carry_state runs paired with it (fmnist_carry_cpu), and
# the report (benchmarks/claim_study.py). About 75 + 20 minutes of one core; the carry runs may go on the
# other core at the same time (they compare quality at equal iterations, not time).
#   bash benchmarks/claim_study.sh [RUNS_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/experiments}
OUT=${2:-benchmarks/results/fmnist_claim_cpu}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 EBDIFF_PROGRESS=lines
EB=.venv/bin/ebdiff
taskset -c 0 $EB experiment configs/experiments/fmnist_claim_cpu.yaml --out "$RUNS/fmnist_claim_cpu" &
taskset -c 1 $EB experiment configs/experiments/fmnist_carry_cpu.yaml --out "$RUNS/fmnist_carry_cpu"
wait
.venv/bin/python benchmarks/claim_study.py --runs "$RUNS/fmnist_claim_cpu" --carry "$RUNS/fmnist_carry_cpu" --out "$OUT"
