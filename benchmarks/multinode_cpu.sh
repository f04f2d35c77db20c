#!/usr/bin/env bash
# Multi-node, simulated on one machine: two torchrun node agents (c10d rendezvous on 127.0.0.1, gloo)
# run `ebdiff train` (DDP over both nodes) and `ebdiff ta-eb` (one region branch per node), then check
# that each run folder was written once (rank 0), finished, and can be sampled. CPU only, ~1 min.
#   bash benchmarks/multinode_cpu.sh [OUT]     (default OUT=runs/multinode_cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/multinode_cpu}
PY=${PYTHON:-.venv/bin/python}
rm -rf "$OUT" && mkdir -p "$OUT"
export OMP_NUM_THREADS=1
TINY="model.preset=tiny data.limit=256 train.batch_size=8 train.device=cpu train.progress=false train.log_every=2 train.ckpt_every=3 sample.steps=5"

two_nodes() {  # $1 = name, rest = the ebdiff command line
  local name=$1 port=$((29500 + RANDOM % 400)); shift
  for n in 0 1; do
    "$PY" -m torch.distributed.run --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d \
      --rdzv_endpoint "127.0.0.1:$port" --rdzv_id "$name" -m ebdiff.cli "$@" > "$OUT/$name-node$n.log" 2>&1 &
  done
  local rc=0
  wait -n || rc=$?; wait -n || rc=$?
  echo "$name: exit $rc"
  return $rc
}

two_nodes train train --out "$OUT/train" $TINY train.iters=6
two_nodes taeb ta-eb --config configs/demo_taeb.yaml --out "$OUT/taeb" $TINY train.iters=6 \
  early_bird.check_every=2 early_bird.queue=2 early_bird.eta=0.9 \
  "regions=[{t: [0, 499], ratio: 0.3}, {t: [480, 999], ratio: 0.6}]"
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
s = json.loads((out / "train/summary.json").read_text())
a = json.loads((out / "taeb/taeb.json").read_text())
print(f"train: {s['processes']} processes, {s['iterations']} iterations, checkpoints "
      f"{sorted(p.name for p in (out / 'train/checkpoints').iterdir())}")
print(f"ta-eb: {len(a['branches'])} branches, tickets at {[b['ticket_iteration'] for b in a['branches']]}, "
      f"weighted {a['weighted_params'] / 1e3:.1f}K params")
PY
"$PY" -m ebdiff.cli sample "$OUT/taeb" --n 4 --device cpu | tail -n 2
