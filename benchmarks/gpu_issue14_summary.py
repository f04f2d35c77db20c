"""Issue 14's verdict from the output folder of benchmarks/gpu_issue14.sh: every bench row with its model
FLOP/s, MFU and compile time, each target marked pass or miss, and for a missed throughput target the
profile that shows what dominates the step.

    python benchmarks/gpu_issue14_summary.py OUT_DIR

Targets (issue 14; `cifar10` preset, batch 128, one H100/H200, all rows of one call): the dense fast path
>= 60 it/s; the 50% ticket >= 120 it/s; the 80% ticket >= 200 it/s; every ticket faster than every
larger one (per mode); a second compilation of a cached shape <= 15 s; the fast path's loss curve within
the seed-to-seed noise of fp32 eager. Also checked: the trainer's whole-step CUDA graph through an
Early-Bird extraction (the H200 crash), and train.compile=auto deciding once per model shape.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = ("bench_core", "bench_layout", "bench_rest", "bench_round", "bench_more")
IT_S_TARGETS = {0.0: 60.0, 0.5: 120.0, 0.8: 200.0}  # fast path, it/s
COMPILE_AGAIN_S = 15.0


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def f(x, nd=1, unit=""):
    return "-" if x is None else f"{x:.{nd}f}{unit}"


def tflops(x):
    return "-" if x is None else f"{x:.3g}"


def row_line(name: str, r: dict) -> str:
    mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}% {r.get('mfu_precision', '')}"
    hit = {True: "hit", False: "miss", None: "-"}[r.get("compile_cache_hit")]
    comp = "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f} ({hit})"
    return (f"| {name} | {r['mode_name']} | {r['ratio']:.2f} | {r.get('round_channels', 1)} | {r['params'] / 1e6:.2f}M | "
            f"{r['macs'] / 1e9:.2f}G | {r['it_s']:.1f} | {r['ms_step']:.2f} | {tflops(r.get('model_tflops_s'))} | {mfu} | "
            f"{f(r.get('speedup_vs_dense'), 2, 'x')} | {comp} |")


def profile_lines(r: dict) -> list[str]:
    p = r.get("profile")
    if not p:
        return []
    head = f"- {r['mode_name']} {r['ratio']:.2f} (round {r.get('round_channels', 1)}): {p['timer']} {p['ms_per_step']:.2f} ms/step"
    if p.get("by_kind"):
        kinds = ", ".join(f"{k} {v['ms_per_step']:.2f} ms ({100 * v['share']:.0f}%)" for k, v in p["by_kind"].items())
        head += f", GPU busy {f(100 * (p.get('busy') or 0), 0)}%, {f(p.get('kernels_per_step'), 0)} kernels/step; {kinds}"
    out = [head]
    for c in p.get("copies", [])[:5]:
        out.append(f"  - copies: {c['ms_per_step']:.3f} ms x{c['calls_per_step']:.0f} per step from `{c['source']}`")
    return out


def summarize(out: Path) -> tuple[str, list[dict]]:
    lines, verdicts = [], []

    def verdict(name: str, ok: bool | None, value: str, target: str) -> None:
        verdicts.append({"target": name, "pass": ok, "value": value, "wanted": target})

    files = {n: load(out / f"{n}.json") for n in BENCH}
    rows = [(n, r) for n, d in files.items() if d for r in d["rows"]]
    dev = next((d for d in files.values() if d), None)
    lines.append(f"# Issue 14 GPU run: {dev['device']}, torch {dev['torch']}" if dev else "# Issue 14 GPU run: no bench output")
    if rows:
        lines += ["", "| file | mode | ratio | round | params | MACs | it/s | ms/step | TFLOP/s | MFU | vs dense | compile s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [row_line(n, r) for n, r in rows]
    # the first row of each (mode, ratio, rounding): all rows of one call, the first measurement wins
    first: dict[tuple, dict] = {}
    for _, r in rows:
        first.setdefault((r["mode_name"], r["ratio"], r.get("round_channels", 1)), r)
    missed = []
    for ratio, target in IT_S_TARGETS.items():
        r = first.get(("fast", ratio, 1))
        name = f"fast {'dense' if ratio == 0 else f'{ratio:.0%} ticket'} >= {target:.0f} it/s"
        ok = None if r is None else r["it_s"] >= target
        verdict(name, ok, "not measured" if r is None else f"{r['it_s']:.1f}", f">= {target:.0f}")
        if ok is False:
            missed.append(r)
    for mode in ("fast",):  # the target is the fast path's; `ebdiff bench` shows every mode's speed-ups
        rs = sorted((r for (m, _, rc), r in first.items() if m == mode and rc == 1), key=lambda r: r["ratio"])
        if len(rs) > 1:
            ok = all(a["it_s"] < b["it_s"] for a, b in zip(rs, rs[1:]))
            speeds = " < ".join("%.1f" % r["it_s"] for r in rs)
            at = ", ".join("%.1f" % r["ratio"] for r in rs)
            verdict(f"{mode}: every ticket faster than every larger one", ok, f"{speeds} it/s at ratios {at}",
                    "increasing")
    for name in ("compile_kept", "compile_artifacts"):
        d = load(out / f"{name}.json")
        for r in (d or {}).get("rows", []):
            if r.get("compile_s") is None:
                continue
            ok = r["compile_s"] <= COMPILE_AGAIN_S and r.get("compile_cache_hit") is True
            verdict(f"second compilation, {name.split('_')[1]} ({r['mode_name']} {r['ratio']:.1f})", ok,
                    f"{r['compile_s']:.1f} s ({'hit' if r.get('compile_cache_hit') else 'no hit'})", f"<= {COMPILE_AGAIN_S:.0f} s")
    curves = load(out / "loss_curves.json")
    if curves and "fast" in curves.get("curves", {}):
        c = curves["curves"]["fast"]
        verdict("fast-path loss curve within seed noise of fp32 eager", c["within_noise"],
                f"ratio {c['ratio']:.2f} to the floor", f"<= {c['tolerance']}")
    else:
        verdict("fast-path loss curve within seed noise of fp32 eager", None, "not measured", "")
    g = load(out / "summary_graph_eb.json")
    log = (out / "graph_eb.log").read_text() if (out / "graph_eb.log").is_file() else ""
    stream_warn = "AccumulateGrad node's stream does not match" in log
    verdict("train.cuda_graph=true through an Early-Bird extraction and recapture",
            None if g is None and not log else bool(g and g.get("phase") == "ticket" and not stream_warn),
            "no run" if g is None else f"phase {g.get('phase')}, {g.get('iterations')} iterations"
            + (", AccumulateGrad stream warning" if stream_warn else ""), "ticket trained, no stream warning")
    a = load(out / "summary_auto_eb.json")
    dec = (a or {}).get("compile_decisions") or []
    gpu = a is not None and str(a.get("device", "")).startswith("cuda")  # on the CPU auto means no compilation
    verdict("train.compile=auto decides per model shape", len(dec) == 2 if gpu else None,
            "; ".join(f"{d['phase']}: {'compile' if d['compile'] else 'no compile'}" for d in dec) or "no decision",
            "dense + ticket")
    layout = [(first.get(("fast", r, 1)), first.get(("fast-layout", r, 1))) for r in (0.0, 0.5)]
    layout = [(a, b) for a, b in layout if a and b]
    if layout:
        lines += ["", "## Forced layout optimisation (train.layout_opt) vs fast", "",
                  "| ratio | fast it/s | fast-layout it/s | change | copy/layout ms (fast -> layout) |", "|---|---|---|---|---|"]
        for a, b in layout:
            ca = (a.get("profile") or {}).get("by_kind", {}).get("copy / layout", {}).get("ms_per_step")
            cb = (b.get("profile") or {}).get("by_kind", {}).get("copy / layout", {}).get("ms_per_step")
            lines.append(f"| {a['ratio']:.2f} | {a['it_s']:.1f} | {b['it_s']:.1f} | {b['it_s'] / a['it_s']:.2f}x | "
                         f"{f(ca, 2)} -> {f(cb, 2)} |")
    lines += ["", "## Targets", "", "| target | value | wanted | verdict |", "|---|---|---|---|"]
    lines += [f"| {v['target']} | {v['value']} | {v['wanted']} | "
              f"{'-' if v['pass'] is None else ('pass' if v['pass'] else 'miss')} |" for v in verdicts]
    if curves:
        from ebdiff.evaluate.curves import format_comparison

        lines += ["", "## Loss curves vs fp32 eager", ""] + [format_comparison(n, c) for n, c in curves["curves"].items()]
    if any(r.get("profile") for _, r in rows):
        lines += ["", "## Where the step time goes (profiled rows" + (", missed targets first" if missed else "") + ")", ""]
        lines += [x for r in missed for x in profile_lines(r)]
        lines += [x for _, r in rows if not any(r is m for m in missed) for x in profile_lines(r)]
    met = [v["pass"] for v in verdicts if v["pass"] is not None]
    lines += ["", f"targets met: {sum(met)} of {len(met)} measured ({len(verdicts) - len(met)} not measured)"]
    return "\n".join(lines), verdicts


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    text, _ = summarize(Path(sys.argv[1]))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
