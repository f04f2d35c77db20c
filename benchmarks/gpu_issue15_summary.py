"""summary.md of the issue-15 study: per method its training budget and speed, its time to the reference's
final quality and the speed-ups, and the paper's claims in shape (EB 50% reaches dense quality in <= 1/2
of dense's time, TA-EB in <= 1/4) as measured: met, not met, or never reached. Reads the experiment's
folder (report/report.json, each run's summary.json / taeb.json).

    python benchmarks/gpu_issue15_summary.py RUNS [--device NAME] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CLAIMS = {"eb-magnitude-50": ("EB 50% reaches dense's final quality in <= 1/2 of dense's time", 2.0),
          "ta-eb": ("TA-EB reaches dense's final quality in <= 1/4 of dense's time", 4.0)}


def read(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def read_lines(p: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []


def run_facts(run: Path) -> dict:
    """Iterations, stop reason, own training and evaluation seconds of a run (TA-EB: its longest branch)."""
    a = read(run / "taeb.json")
    if a is not None:
        sums = [read(run / b["dir"] / "summary.json") or {} for b in a["branches"]]
        k = max(range(len(sums)), key=lambda i: (sums[i].get("time_s") or {}).get("own_total", 0))
        s = sums[k]
        return {"iterations": "/".join(str(x.get("iterations")) for x in sums),
                "stopped": "/".join(str(x.get("stopped")) for x in sums),
                "own_s": (s.get("time_s") or {}).get("own_total"),
                # the branches' snapshots and the ensemble's scoring after training
                "eval_s": sum((x.get("time_s") or {}).get("eval_s", 0.0) for x in sums) + sum(
                    r.get("eval_s", 0.0) for r in read_lines(run / "metrics.jsonl") if r.get("event") == "eval"),
                "it_s": (s.get("iterations") or 0) / max((s.get("time_s") or {}).get("own_total") or 1e-9, 1e-9)}
    s = read(run / "summary.json") or {}
    t = s.get("time_s") or {}
    return {"iterations": s.get("iterations"), "stopped": s.get("stopped"), "own_s": t.get("own_total"),
            "eval_s": t.get("eval_s"), "it_s": (s.get("iterations") or 0) / max(t.get("own_total") or 1e-9, 1e-9)}


def claim_verdicts(ttq: dict) -> list[str]:
    rows = {r["name"]: r for r in ttq["rows"]}
    out = []
    for name, (text, need) in CLAIMS.items():
        r = rows.get(name)
        if r is None:
            out.append(f"- {text}: no `{name}` curve")
        elif r["speedup_at_reference"] is None:
            best = r["best"]
            out.append(f"- {text}: **not reached** (best {best['value']:.2f} at {best['train_s']:.1f} s; "
                       f"dense's final {ttq['reference_final']:.2f})")
        else:
            ok = r["speedup_at_reference"] >= need
            out.append(f"- {text}: **{'met' if ok else 'not met'}**, {r['speedup_at_reference']:.2f}x "
                       f"({r['to_reference_s']:.1f} s against dense's {ttq['reference_to_final_s']:.1f} s; "
                       f"needs >= {need:g}x)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs")
    ap.add_argument("--device", default="")
    ap.add_argument("--seconds", type=float)
    a = ap.parse_args(argv)
    runs = Path(a.runs)
    rep = read(runs / "report" / "report.json")
    lines = ["# Issue 15: quality over training time", ""]
    if a.device or a.seconds:
        lines += [f"Device: {a.device}; script time {a.seconds or 0:.0f} s.", ""]
    if not rep or not rep.get("time_to_quality"):
        lines.append("No report with evaluation points (the study did not get that far): see the logs.")
        print("\n".join(lines))
        return 1
    ttq, metric = rep["time_to_quality"], rep["metric"]
    methods = {r["name"]: r for r in rep["runs"]}
    lines += [f"Reference: `{ttq['reference']}`, final {metric} {ttq['reference_final']:.2f} (first reached at "
              f"{ttq['reference_to_final_s']:.1f} s of training). Training time excludes evaluation.", "",
              f"| run | method | iterations | stopped by | it/s | train s | eval s | final {metric} | "
              f"time to dense's final | speed-up at equal quality | paper's speed-up |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda x, nd=2: "-" if x is None else f"{x:.{nd}f}"  # noqa: E731
    fx = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    for r in ttq["rows"]:
        facts = run_facts(runs / r["name"])
        m = methods.get(r["name"], {})
        reached = f"{r['to_reference_s']:.1f} s" if r["to_reference_s"] is not None else "not reached"
        lines.append(f"| {r['name']} | {m.get('method', '-')} | {facts['iterations']} | {facts['stopped']} | "
                     f"{f(facts['it_s'], 1)} | {f(r['train_s'], 1)} | {f(facts['eval_s'], 1)} | "
                     f"{r['final']['value']:.2f} | {reached} | {fx(r['speedup_at_reference'])} | "
                     f"{fx(r['paper_speedup'])} |")
    lines += ["", "The paper's claims in shape, as measured (never tuned to):", *claim_verdicts(ttq)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
