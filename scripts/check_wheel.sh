#!/usr/bin/env bash
# The package as a user gets it: build the wheel, install it (not editable) into a fresh virtual
# environment, and run `ebdiff info` and a short `ebdiff demo` from outside the repository.
# The fresh environment borrows the dependencies (torch, diffusers, ...) already installed in PYTHON's
# environment through one .pth line instead of downloading them again; ebdiff itself must come from
# the wheel (checked). Usage: [PYTHON=.venv/bin/python] bash scripts/check_wheel.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$repo/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)

# 1. build from a copy of the checkout's files (tracked + untracked, not ignored): an old build/ folder
#    in the checkout cannot leak stale modules into the wheel
mkdir "$work/src"
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$repo" && git ls-files -z -co --exclude-standard | xargs -0 tar -cf - --no-recursion) | tar -xf - -C "$work/src"
else
  cp -a "$repo/." "$work/src/"
fi
# without build isolation when PYTHON already has a recent setuptools (no index needed), else pip fetches it
if "$PY" -c "import setuptools, sys; sys.exit(int(int(setuptools.__version__.split('.')[0]) < 77))" 2>/dev/null; then
  iso=--no-build-isolation
else
  iso=
fi
"$PY" -m pip wheel "$work/src" --no-deps $iso -q -w "$work/dist"
wheel=$(ls "$work"/dist/ebdiff-*.whl)
echo "built $(basename "$wheel")"

# 2. a fresh environment with the wheel installed as a user would (pip install, not editable)
"$PY" -m venv "$work/venv"
V="$work/venv/bin/python"
"$V" -m pip install -q --no-deps --no-index "$wheel"
site=$("$V" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$site/_ebdiff_check_deps.pth"

# 3. from outside the repository
mkdir "$work/elsewhere"
cd "$work/elsewhere"
"$V" - "$site" <<'EOF'
import sys
from pathlib import Path
import ebdiff
from ebdiff.config import bundled_configs
where = Path(ebdiff.__file__).resolve()
assert str(where).startswith(str(Path(sys.argv[1]).resolve())), f"ebdiff imported from {where}, not the wheel"
assert (bundled_configs() / "demo.yaml").is_file() and (bundled_configs() / "experiments" / "cifar10_table4.yaml").is_file()
print(f"ebdiff {ebdiff.__version__} from {where.parent}")
EOF
"$work/venv/bin/ebdiff" info
"$work/venv/bin/ebdiff" demo --out demo-run train.iters=20 train.batch_size=8 train.device=cpu train.progress=false data.limit=256 \
  early_bird.check_every=5 early_bird.queue=2 early_bird.eta=0.5 sample.steps=5
for f in summary.json ticket.json samples_ddim5.png hamming.png config.yaml; do
  [ -s "demo-run/$f" ] || { echo "ebdiff demo left no demo-run/$f" >&2; exit 1; }
done
"$work/venv/bin/ebdiff" experiment fmnist_table4_cpu --dry-run --out exp >/dev/null
echo "wheel check passed in $(( $(date +%s) - t0 )) s"
