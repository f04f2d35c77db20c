#!/usr/bin/env bash
# Cold vs cached compilation of one training-step shape, each in a fresh process (`ebdiff bench`, one
# compiled row; its "compile" is warm-up time minus the warm-up steps at the measured step time):
#   cold        an empty cache folder
#   kept        the same folder again (inductor's folder and the artifacts are there)
#   moved       the whole folder copied to another path (a second machine of the same kind)
#   artifacts   only artifacts/ copied to a new folder (what a device run would carry): the mega-cache alone
# Usage: bash benchmarks/compile_cache_cpu.sh [OUT_DIR] [extra ebdiff bench args]
# (defaults: tiny preset, batch 4, on the CPU; on a GPU pass e.g. --preset cifar10 --batch 128 --device cuda --modes fast)
set -u
OUT=${1:-/tmp/cc_cpu}; shift || true
PY=${PYTHON:-python3}
W=$(mktemp -d)
B="$PY -m ebdiff.cli bench --ratios 0 --steps 5 --warmup 2"
ARGS=${*:---preset tiny --batch 4 --device cpu --modes compiled}
mkdir -p "$OUT"
run() { local name=$1 dir=$2; echo "=== $name ($dir)"; local t0=$(date +%s.%N)
  $B $ARGS --compile-cache "$dir" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1; local rc=$?
  local t1=$(date +%s.%N); grep -E "ratio 0.00:" "$OUT/$name.log" | head -1
  echo "$name rc=$rc process wall $(echo "$t1 - $t0" | bc) s"; }
run cold "$W/a"
run kept "$W/a"
cp -r "$W/a" "$W/moved" && run moved "$W/moved"
mkdir -p "$W/art" && cp -r "$W/a/artifacts" "$W/art/" && run artifacts "$W/art"
du -sh "$W/a/inductor" "$W/a/artifacts" | tee "$OUT/sizes.txt"
ls -la "$W/a/artifacts" "$W/a/timings" >> "$OUT/sizes.txt"
rm -rf "$W"
