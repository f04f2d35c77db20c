"""train.layout_opt on the CPU, with mkldnn off so that convolutions pick their memory format by cuDNN's
rule (issue 14, item 4): the compiled channels_last step with inductor's layout heuristic (which turns the
optimisation off for a UNet) against the same step with the optimisation forced. Prints each row's copies
by launching operator (`ebdiff bench --profile`), its loss after the same steps (the change must not alter
the training) and its speed.

    python benchmarks/layout_opt_cpu.py [--preset tiny] [--batch 4] [--steps 3] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ebdiff.evaluate.bench import bench_one
from ebdiff.training.compile_cache import CompileCache
from ebdiff.training.step import FastPath


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--profile", type=int, default=2)
    ap.add_argument("--compile-cache", default="auto")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.backends.mkldnn.enabled = False
    cache = CompileCache.from_setting(args.compile_cache, "cpu")
    rows = []
    for name, fast in (("compiled (heuristic)", FastPath(channels_last=True, compile="default")),
                       ("compiled + layout_opt", FastPath(channels_last=True, compile="default", layout_opt=True))):
        torch.manual_seed(0)
        r = bench_one(args.preset, 0.0, fast, args.batch, args.steps, 1, torch.device("cpu"), profile=args.profile,
                      cache=cache)
        r["name"] = name
        rows.append(r)
        # layout copies: `.contiguous(fmt)` inside a convolution's forward or backward (thnn's own im2col
        # copies, `aten::copy_ < aten::_slow_conv2d_forward`, are its algorithm, not a layout change)
        conv = [c for c in r["profile"]["copies"] if "contiguous" in c["source"] and "conv" in c["source"]]
        print(f"{name}: {r['ms_step']:.1f} ms/step, loss after {1 + args.steps} steps {r['final_loss']:.6f}, "
              f"compile {r['compile_s']:.0f} s; layout copies in convolutions: "
              f"{sum(c['calls_per_step'] for c in conv):.0f} per step ({sum(c['ms_per_step'] for c in conv):.2f} ms)")
        for c in r["profile"]["copies"]:
            print(f"    {c['ms_per_step']:7.3f} ms  x{c['calls_per_step']:<4.0f} {c['source']}")
    print(f"loss difference: {abs(rows[0]['final_loss'] - rows[1]['final_loss']):.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
