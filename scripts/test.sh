#!/usr/bin/env bash
# One command: install ebdiff with its test dependencies in .venv and run the test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
