#!/usr/bin/env bash
# Shared set-up: a virtual environment in .venv with ebdiff installed, and Fashion-MNIST on disk.
# Usage: source scripts/setup.sh [pip extras, e.g. "test"]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
extras=${1:-}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch 2.14.1 / torchvision 0.29.1: the pair that installs from a local wheel cache on our machines
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v '^WARNING: Location' || true
if [ -n "$extras" ]; then spec=".[${extras}]"; else spec="."; fi
.venv/bin/python -m pip install -q -e "$spec" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import ebdiff, torch, diffusers, torch_pruning" || { echo "installation failed" >&2; exit 1; }
# Fashion-MNIST: the Debian package when apt and root are here; else ebdiff downloads it on first use
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
     echo "note: apt could not install dataset-fashion-mnist; ebdiff will try a torchvision download" >&2
  else
    echo "note: no root/apt: Fashion-MNIST will be downloaded by torchvision on first use" >&2
  fi
fi
