"""The report of the claim study (configs/experiments/fmnist_claim_cpu.yaml, issue 25): at the same final size,
Early-Bird against Scratch and train-prune-finetune on a ladder of budgets, with seeds; TA-EB's two time
accountings; and, when given, the carry_state study (fmnist_carry_cpu.yaml) paired with the fresh EB runs.

Reads the run folders that `ebdiff experiment` wrote (names: dense-sS, eb-50-sS, scratch-50-sS, pft-50-sS-rK,
ta-eb-sS, eb-50-carry-sS) and writes report.md, report.json and quality_vs_time.png to --out. The
definitions (rungs, spread over seeds, time to a quality, speed-up at equal quality and size) are those of
`ebdiff.evaluate.ladder`.

    python benchmarks/claim_study.py --runs runs/experiments/fmnist_claim_cpu \
        --carry runs/experiments/fmnist_carry_cpu --out benchmarks/results/fmnist_claim_cpu
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from ebdiff.evaluate.ladder import Rung, equal_quality, quality_at_budget, rung_stats, spread, verdict
from ebdiff.evaluate.report import pyplot
from ebdiff.files import read_json
from ebdiff.runs.checkpoint import METRICS_FILE, read_records

NAME = re.compile(r"^(?P<method>dense|eb-50|eb-50-carry|scratch-50|pft-50|ta-eb)-s(?P<seed>\d+)(?:-r(?P<rung>\d+))?$")
LABEL = {"dense": "dense", "eb-50": "EB 50%", "scratch-50": "Scratch 50%", "pft-50": "prune+finetune 50%",
         "ta-eb": "TA-EB 30/60/80% (longest branch)", "ta-eb-all": "TA-EB 30/60/80% (all branches, one device)",
         "eb-50-carry": "EB 50% carry_state"}


def evals(run: Path) -> list[dict]:
    return [r for r in read_records(run / METRICS_FILE) if r.get("event") == "eval" and "value" in r]


def losses(run: Path) -> dict[int, float]:
    return {int(r["iter"]): float(r["loss"]) for r in read_records(run / METRICS_FILE) if "loss" in r}


def collect(root: Path) -> tuple[dict, dict, dict]:
    """(ladders: method -> seed -> [Rung], sizes: method -> {params, macs, ...}, extra: per-run facts)."""
    runs = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        m = NAME.match(d.name)
        if m:
            runs[d.name] = (m["method"], int(m["seed"]), int(m["rung"]) if m["rung"] else None, d)
    ladders: dict[str, dict[int, list[Rung]]] = {}
    sizes: dict[str, dict] = {}
    extra: dict[str, dict] = {"tickets": {}}
    dense_t = {s: {i + 1: e["train_s"] for i, e in enumerate(evals(d))}
               for _, (meth, s, _, d) in runs.items() if meth == "dense"}
    for name, (meth, s, k, d) in runs.items():
        pts = evals(d)
        if not pts:
            continue
        summ = read_json(d / "summary.json") or {}
        if meth == "ta-eb":
            a = read_json(d / "taeb.json") or {}
            by_t = (a.get("weightings") or {}).get("timesteps") or {}
            sizes["ta-eb"] = sizes["ta-eb-all"] = {"params": a.get("weighted_params"), "macs": a.get("weighted_macs"),
                                                   "params_by_timesteps": by_t.get("params"),
                                                   "macs_by_timesteps": by_t.get("macs")}
            ladders.setdefault("ta-eb", {})[s] = [Rung(i + 1, e["value"], e["train_s"]) for i, e in enumerate(pts)]
            ladders.setdefault("ta-eb-all", {})[s] = [Rung(i + 1, e["value"], sum(e["branch_train_s"]))
                                                      for i, e in enumerate(pts)]
            extra["ta-eb"] = {"branches": [{"ratio": b["region"]["ratio"], "params": b["params"], "train_s": b["train_s"],
                                            "ticket_iteration": b["ticket_iteration"]} for b in a.get("branches", [])],
                              "device_seconds": a.get("device_seconds")}
            continue
        size = summ.get("ticket") or summ.get("dense")
        sizes.setdefault(meth, size)
        if meth == "pft-50":
            last = pts[-1]
            ladders.setdefault(meth, {}).setdefault(s, []).append(Rung(k, last["value"], last["train_s"]))
            ladders[meth][s].sort(key=lambda r: r.k)
        elif meth == "scratch-50":  # rung k: the dense model at kN (the same structure at every rung) + its own time
            ladders.setdefault(meth, {})[s] = [Rung(i + 1, e["value"], e["own_train_s"] + dense_t[s][i + 1])
                                               for i, e in enumerate(pts) if i + 1 in dense_t.get(s, {})]
        else:
            ladders.setdefault(meth, {})[s] = [Rung(i + 1, e["value"], e["train_s"]) for i, e in enumerate(pts)]
        if meth.startswith("eb-50"):
            extra["tickets"][name] = (summ.get("ticket_info") or {}).get("iteration")
        extra.setdefault("iters", {}).setdefault(meth, [e["iter"] for e in pts])
    return ladders, sizes, extra


def fmt(st: dict, d: int = 1) -> str:
    if not st or st["mean"] is None:
        return "-"
    return f"{st['mean']:.{d}f} ± {st['sd']:.{d}f}" if st["n"] > 1 else f"{st['mean']:.{d}f}"


def figure(ladders: dict, sizes: dict, path: Path, metric: str) -> None:
    """Quality against training time, one line per method through its rungs (mean over seeds, bars: one
    standard deviation), marker area by parameters (the paper's Figure 1)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    pmax = max(v["params"] for v in sizes.values() if v and v.get("params"))
    for meth, lad in ladders.items():
        st = rung_stats(lad)
        xs, ys = [r["train_s"]["mean"] for r in st], [r["value"]["mean"] for r in st]
        xe, ye = [r["train_s"]["sd"] for r in st], [r["value"]["sd"] for r in st]
        line = ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="-", lw=1, capsize=2, label=LABEL.get(meth, meth))
        area = 30 + 270 * (sizes.get(meth, {}).get("params") or pmax) / pmax
        ax.scatter(xs, ys, s=area, color=line[0].get_color(), alpha=0.6, edgecolors="k", linewidths=0.5)
        for r, x, y in zip(st, xs, ys):
            ax.annotate(f"{r['k']}N", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("training time, s (one CPU core; Scratch and prune+finetune include their dense model)")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.set_title("Quality against training time (marker area: parameters; bars: 1 sd over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True)
    ap.add_argument("--carry", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=640, help="the ladder's N (dense iterations of rung 1)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ladders, sizes, extra = collect(Path(a.runs))
    if a.carry:
        lc, sc, ec = collect(Path(a.carry))
        ladders.update(lc)
        sizes.update(sc)
        extra["tickets"].update(ec["tickets"])
    metric = "FD-FMNIST"
    # the carry_state runs trained on the other core beside other work: their quality is compared at equal
    # iterations in their own section, their times are not comparable and stay out of the table and figure
    order = [m for m in ("dense", "eb-50", "scratch-50", "pft-50", "ta-eb", "ta-eb-all") if m in ladders]
    dense = {r["k"]: r for r in rung_stats(ladders["dense"])} if "dense" in ladders else {}
    lines = ["# The paper's claim at CPU scale: Early-Bird against Scratch and prune+finetune at the same size", "",
             f"Budget ladder N = {a.n} dense iterations; rung k: dense kN, EB 9kN/8 (search + ticket), Scratch 9kN/8 "
             "after the dense model at kN, prune+finetune kN/8 after the dense model at kN, TA-EB kN/4 per branch. "
             f"{metric} of 400 samples, 20 DDIM steps; training time excludes evaluation and includes the dense model "
             "a baseline was cut from. Mean ± sample standard deviation over seeds (n = seeds).", "",
             "| method | params | MACs | rung | " + metric + " | train time s | speed-up over dense at that rung | n |",
             "|---|---|---|---|---|---|---|---|"]
    table = {}
    for meth in order:
        sz = sizes.get(meth) or {}
        rows = rung_stats(ladders[meth])
        table[meth] = rows
        for r in rows:
            dk = dense.get(r["k"])
            up = (f"{dk['train_s']['mean'] / r['train_s']['mean']:.2f}x" if dk and r["train_s"]["mean"] else "-")
            lines.append(f"| {LABEL.get(meth, meth)} | {sz.get('params', 0) / 1e3:.1f}K | {sz.get('macs', 0) / 1e6:.2f}M | "
                         f"{r['k']}N | {fmt(r['value'])} | {fmt(r['train_s'])} | {up} | {r['value']['n']} |")
    verdicts, eq = [], {}
    pairs = [("eb-50", "scratch-50"), ("eb-50", "pft-50"), ("scratch-50", "pft-50"), ("eb-50", "dense")]
    for x, y in pairs:
        if x in ladders and y in ladders:
            eq[f"{x} vs {y}"] = res = equal_quality(ladders[x], ladders[y])
            verdicts.append(verdict(LABEL[x], LABEL[y], res, metric,
                                    "at a quarter of its size" if y == "dense" else "at the same size"))
    qb = {f"{x} vs {y}": quality_at_budget(ladders[x], ladders[y]) for x, y in pairs[:2] + [("eb-50", "dense")]
          if x in ladders and y in ladders}
    lines += ["", "## Verdicts", "", *[f"- {v}" for v in verdicts], "",
              "## Quality at the same budget (seed s against seed s)", "",
              f"| comparison | rung | A {metric} | B {metric} | seeds where A is better |", "|---|---|---|---|---|"]
    for key, rows in qb.items():
        for r in rows:
            lines.append(f"| {key} | {r['k']}N | {fmt(r['a'])} | {fmt(r['b'])} | {r['a_better']} of {r['n']} |")
    if "ta-eb" in ladders:
        lines += ["", "## TA-EB: one device per branch (the paper's count) and one device for all branches", "",
                  "| rung | " + metric + " | longest branch s | speed-up over dense | all branches s | speed-up over dense |",
                  "|---|---|---|---|---|---|"]
        for r1, r2 in zip(table["ta-eb"], table["ta-eb-all"]):
            dk = dense.get(r1["k"], {}).get("train_s", {}).get("mean")
            lines.append(f"| {r1['k']}N | {fmt(r1['value'])} | {fmt(r1['train_s'])} | "
                         f"{dk / r1['train_s']['mean']:.2f}x | {fmt(r2['train_s'])} | {dk / r2['train_s']['mean']:.2f}x |"
                         if dk else f"| {r1['k']}N | {fmt(r1['value'])} | - | - | - | - |")
    if "eb-50-carry" in ladders and "eb-50" in ladders:
        lines += ["", "## early_bird.carry_state against the fresh start (same seeds, same evaluation points)", "",
                  f"| seed | ticket at | loss 81-160 fresh / carried | loss 161-240 | {metric} 1N fresh / carried | "
                  "2N | 3N |", "|---|---|---|---|---|---|---|"]
        root_c = Path(a.carry)
        diffs = {1: [], 2: [], 3: []}
        for s in sorted(set(ladders["eb-50"]) & set(ladders["eb-50-carry"])):
            lf, lc = losses(Path(a.runs) / f"eb-50-s{s}"), losses(root_c / f"eb-50-carry-s{s}")
            f, c = ladders["eb-50"][s], ladders["eb-50-carry"][s]
            cells = []
            for rf, rc in zip(f, c):
                cells.append(f"{rf.value:.1f} / {rc.value:.1f}")
                diffs[rf.k].append(rc.value - rf.value)
            lw = [f"{lf.get(i, float('nan')):.3f} / {lc.get(i, float('nan')):.3f}" for i in (160, 240)]
            lines.append(f"| {s} | {extra['tickets'].get(f'eb-50-s{s}')} / {extra['tickets'].get(f'eb-50-carry-s{s}')} | "
                         f"{lw[0]} | {lw[1]} | " + " | ".join(cells) + " |")
        extra["carry_minus_fresh"] = {k: spread(v) for k, v in diffs.items() if v}
        lines += ["", "carried - fresh " + metric + " per rung (mean ± sd over seeds; negative = carrying is better): " +
                  ", ".join(f"{k}N {fmt(v)}" for k, v in extra["carry_minus_fresh"].items())]
    figure({m: ladders[m] for m in order}, sizes, out / "quality_vs_time.png", metric)
    lines += ["", "![quality against training time](quality_vs_time.png)", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    rec = {"n": a.n, "metric": metric, "sizes": sizes, "rungs": table, "equal_quality": eq, "quality_at_budget": qb,
           "verdicts": verdicts, "extra": extra,
           "ladders": {m: {s: [r.__dict__ for r in rs] for s, rs in lad.items()} for m, lad in ladders.items()}}
    (out / "report.json").write_text(json.dumps(rec, indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
