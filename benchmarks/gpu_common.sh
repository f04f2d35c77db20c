# Sourced by the GPU session scripts: output folder, the carried wheels on PYTHONPATH, the GPU's name,
# `stage NAME LIMIT CMD...` (each stage has its own time limit so that a slow or failing stage
# cannot eat the others; its log goes to $OUT/NAME.log) and `run_if NAME MIN LIMIT CMD...` (a stage
# of $STAGES (a word of it names the stage or its prefix before _), run with min(LIMIT, time left of DEADLINE) when at least MIN seconds are left;
# LIMIT_SCALE multiplies MIN and LIMIT: a CPU dry run is slower than the GPU).
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-20}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
else
  export PYTHONPATH=$PWD/src
fi
E="python3 -m ebdiff.cli"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, torch_pruning; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'tp', torch_pruning.__version__)" | tee -a "$OUT/gpu.txt"
stage() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s) ==="; local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?; tail -n 30 "$OUT/$name.log"
  echo "=== $name rc=$rc $(( $(date +%s) - t0 )) s ==="; }
STAGES=${STAGES:-}
DEADLINE=${DEADLINE:-560}
T0=$(date +%s)
run_if() { local name=$1 min=$(( $2 * ${LIMIT_SCALE:-1} )) limit=$(( $3 * ${LIMIT_SCALE:-1} )); shift 3
  local w hit=""
  for w in $STAGES; do case "$name" in "$w"|"$w"_*) hit=1 ;; esac; done
  [ -n "$hit" ] || return 0
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  if [ "$left" -lt "$min" ]; then echo "=== $name skipped: ${left}s left, needs ${min}s ==="; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  stage "$name" "$limit" "$@"; }
