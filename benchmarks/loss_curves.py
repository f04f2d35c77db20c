"""Compare training runs' loss curves with a reference, against the seed-to-seed noise floor.

    python benchmarks/loss_curves.py REF_RUN CAND_RUN [CAND_RUN ...] --noise RUN_A RUN_B [--after 500] [--json F]

REF_RUN and each CAND_RUN are run folders (their metrics.jsonl); RUN_A and RUN_B are two runs of one
mode that differ only in train.seed. A candidate is "within noise" when its mean relative distance
to the reference is at most --tolerance times that of the seed pair (see ebdiff.evaluate.curves). Issue 7's
target "the fast path's loss curve matches fp32 eager within bf16 noise" is judged this way by
gpu_issue7.sh; the JSON is what gpu_issue7_summary.py --curves reads.
"""

import argparse
import json
import sys
from pathlib import Path

from ebdiff.evaluate.curves import TOLERANCE, compare, distance, format_comparison, read_curve


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref")
    ap.add_argument("candidates", nargs="+")
    ap.add_argument("--noise", nargs=2, required=True, metavar=("RUN_A", "RUN_B"))
    ap.add_argument("--after", type=int, default=500, help="ignore logged points up to this iteration")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE)
    ap.add_argument("--json")
    args = ap.parse_args()
    curves = {p: read_curve(p) for p in [args.ref, *args.candidates, *args.noise]}
    missing = [p for p in [args.ref, *args.noise] if not curves[p]]
    if missing:
        print(f"no logged losses in: {', '.join(missing)}", file=sys.stderr)
        return 2
    noise = (curves[args.noise[0]], curves[args.noise[1]])
    try:
        distance(*noise, args.after)
    except ValueError as e:  # e.g. a run cut short by a time limit
        print(f"no noise floor from {' and '.join(args.noise)}: {e}", file=sys.stderr)
        return 2
    out = {"reference": args.ref, "noise_pair": args.noise, "curves": {}}
    for cand in args.candidates:
        try:
            c = compare(curves[args.ref], curves[cand], noise, args.after, args.tolerance)
        except ValueError as e:
            print(f"{cand}: skipped ({e})", file=sys.stderr)
            continue
        out["curves"][Path(cand).name] = c
        print(format_comparison(Path(cand).name, c))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
