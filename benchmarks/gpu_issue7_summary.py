"""Issue 7's verdict from `ebdiff bench` JSON files: one table per mode and the targets, pass or miss.

    python benchmarks/gpu_issue7_summary.py OUT/bench_core.json OUT/bench_rest.json [--curves OUT/loss_curves.json]

Targets (issue 7, `cifar10` preset, batch 128, one GPU, same run for all rows): the dense fast path
at least 60 it/s; the 50% ticket at least 3.0x the dense row of its own mode; the 30% ticket at least
2.0x (above that ticket's MACs ratio, 1.79x: only reachable if the dense model uses the GPU worse per
MAC); other ratios (80%, TA-EB regions: "likewise by their MACs") at least 0.75x their MACs ratio,
the 50% target's share of its 4x. Rows of one mode are compared with that mode's dense row from the
same file only. The loss-curve target (the fast path's curve matches fp32 eager within bf16 noise over
2,000 Fashion-MNIST iterations) is judged by benchmarks/loss_curves.py against two seeds of the fast
path (ebdiff.evaluate.curves).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

SHARE_OF_MACS = 0.75  # 3.0x of the 50% ticket's 4.0x MACs ratio
FIXED = {0.5: 3.0, 0.3: 2.0}


def target(ratio: float, macs_ratio: float) -> float:
    return FIXED.get(round(ratio, 2), SHARE_OF_MACS * macs_ratio)


def summarize(files: list[str]) -> tuple[str, list[dict]]:
    lines, verdicts = [], []
    for path in files:
        d = json.load(open(path))
        lines.append(f"## {path}: {d['device']}, torch {d['torch']}{' (partial)' if d.get('partial') else ''}")
        by_mode = defaultdict(list)
        for r in d["rows"]:
            by_mode[r["mode_name"]].append(r)
        for mode, rows in by_mode.items():
            lines += ["", f"### {mode}: {rows[0]['mode']}", "",
                      "| ratio | it/s | ms/step | MACs ratio | speed-up vs dense | target | verdict | warm-up s |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in rows:  # `ebdiff bench` gives each row its speed-up and MACs ratio against its mode's dense row
                sp, macs_ratio = r.get("speedup_vs_dense"), r.get("macs_ratio")
                if sp is None:
                    tg, v = None, "no dense row"
                elif r["ratio"] == 0:
                    tg = 60.0 if mode == "fast" else None
                    v = "-" if tg is None else ("pass" if r["it_s"] >= tg else "miss")
                else:
                    tg = target(r["ratio"], macs_ratio)
                    v = "pass" if sp >= tg else "miss"
                macs = "-" if macs_ratio is None else f"{macs_ratio:.2f}x"
                tgt = "-" if tg is None else (f">= {tg:.0f} it/s" if r["ratio"] == 0 else f">= {tg:.2f}x")
                spd = "-" if sp is None else f"{sp:.2f}x"
                lines.append(f"| {r['ratio']:.2f} | {r['it_s']:.1f} | {r['ms_step']:.2f} | {macs} | {spd} | {tgt} | "
                             f"{v} | {r['warmup_s']:.1f} |")
                if tg is not None:
                    verdicts.append({"file": path, "mode": mode, "ratio": r["ratio"], "value": r["it_s"] if r["ratio"] == 0 else sp,
                                     "target": tg, "pass": v == "pass"})
                if "profile" in r and r["profile"].get("busy") is not None:
                    p = r["profile"]
                    kinds = ", ".join(f"{k} {100 * x['share']:.0f}%" for k, x in p["by_kind"].items())
                    lines.append(f"|  | profile: GPU busy {100 * p['busy']:.0f}%, {p['kernels_per_step']:.0f} "
                                 f"kernels/step; {kinds} | | | | | | |")
        lines.append("")
    return "\n".join(lines), verdicts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--curves", help="loss_curves.json from benchmarks/loss_curves.py (gpu_issue7.sh)")
    args = ap.parse_args()
    text, verdicts = summarize(args.files)
    print(text)
    curves = {}
    if args.curves:
        from ebdiff.evaluate.curves import format_comparison

        curves = json.load(open(args.curves))["curves"]
        print("\n## Loss curves vs fp32 eager (seed-noise floor: two seeds of the fast path)\n")
        for name, c in curves.items():
            print(format_comparison(name, c))
    fast = [v["pass"] for v in verdicts if v["mode"] == "fast"]
    if "fast" in curves:
        fast.append(curves["fast"]["within_noise"])
    print(f"\nfast-path targets: {sum(fast)} of {len(fast)} met")


if __name__ == "__main__":
    main()
