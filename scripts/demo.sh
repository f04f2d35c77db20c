#!/usr/bin/env bash
# One command: install ebdiff in .venv, make Fashion-MNIST available, run the EB-Diff-Train demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/ebdiff demo "$@"
