"""Budget ladders over seeds: the paper's comparison when no method can be trained to a plateau.

A ladder is one method trained with one seed at budgets N, 2N, 3N, ... (the paper's proportions of N for
each method), each budget a **rung** `Rung(k, value, train_s)`: the quality reached (lower is better:
FD, FID) and the training seconds it took, everything the method depends on included (the dense
model a Scratch or prune+finetune baseline was cut from). Pure logic, no I/O; definitions:

- **spread** over seeds: n, mean, the sample standard deviation (0 for one seed), min and max.
- **time to a quality** on a ladder: its rungs taken as a curve of (train_s, value) points, reached at the
  linear interpolation between the first rung at or below the target and the rung before it
  (`quality_curves.time_to_target(interpolate=True)`); never extrapolated: a ladder whose rungs all lie
  above the target does not reach it (None).
- **speed-up at equal quality and size** of method A over method B, per seed s: B_s's time to its own final
  quality (its top rung's value, reached possibly before the top rung) / A_s's time to that same value.
  Seeds are paired by their index; a seed where A never reaches it has no speed-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .quality_curves import Point, time_to_target


@dataclass(frozen=True)
class Rung:
    k: int  # the budget is k * N
    value: float  # quality at that budget (lower is better)
    train_s: float  # training seconds to reach that budget, dependencies included


def spread(xs: list[float]) -> dict:
    """n, mean, sd (sample standard deviation; 0 for a single value), min, max of a list of numbers."""
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {"n": n, "mean": m, "sd": sd, "min": min(xs), "max": max(xs)}


def rung_stats(ladders: dict[int, list[Rung]]) -> list[dict]:
    """Per rung k of one method: the spread over seeds of its quality and of its training time.
    ladders: seed -> that seed's rungs."""
    ks = sorted({r.k for rungs in ladders.values() for r in rungs})
    rows = []
    for k in ks:
        at = [r for rungs in ladders.values() for r in rungs if r.k == k]
        rows.append({"k": k, "value": spread([r.value for r in at]), "train_s": spread([r.train_s for r in at])})
    return rows


def time_to(rungs: list[Rung], target: float) -> float | None:
    """Training seconds at which a ladder reaches `target` (interpolated between rungs), None if it never does."""
    return time_to_target([Point(r.train_s, r.value, r.k) for r in rungs], target, interpolate=True)


def equal_quality(a: dict[int, list[Rung]], b: dict[int, list[Rung]]) -> dict:
    """Method A against method B at B's final quality, seed by seed (seeds present in both).

    Returns {"seeds": [{seed, target, b_s, a_s, speedup}], "speedup": spread of the speed-ups reached,
    "reached": how many seeds of A reached B's final quality, "n": seeds compared}."""
    per = []
    for s in sorted(set(a) & set(b)):
        rb = sorted(b[s], key=lambda r: r.k)
        if not rb or not a[s]:
            continue
        target = rb[-1].value
        tb, ta = time_to(rb, target), time_to(sorted(a[s], key=lambda r: r.k), target)
        per.append({"seed": s, "target": target, "b_s": tb, "a_s": ta,
                    "speedup": tb / ta if ta and tb is not None else None,
                    "a_best": min(r.value for r in a[s])})
    ups = [p["speedup"] for p in per if p["speedup"] is not None]
    return {"seeds": per, "speedup": spread(ups), "reached": len(ups), "n": len(per)}


def verdict(label_a: str, label_b: str, res: dict, metric: str, size: str = "at the same size") -> str:
    """One line: does A reach B's final quality (`size`: how their sizes compare), and in how much less time
    (per seed)."""
    n, reached = res["n"], res["reached"]
    if n == 0:
        return f"{label_a} vs {label_b}: no seed of both to compare"
    seeds = ", ".join(f"{p['speedup']:.2f}x" if p["speedup"] is not None else
                      f"not reached (best {p['a_best']:.1f} vs {p['target']:.1f})" for p in res["seeds"])
    if reached == 0:
        return f"{label_a} does not reach {label_b}'s final {metric} {size} in any seed (seeds: {seeds})"
    sp = res["speedup"]
    how = f"{sp['mean']:.2f}x less time" if sp["mean"] >= 1 else f"{1 / sp['mean']:.2f}x more time"
    head = f"{label_a} reaches {label_b}'s final {metric} {size} in {how}"
    tail = f" in {reached} of {n} seeds" if reached < n else ""
    return f"{head}{tail} (mean over seeds that reach it; seeds: {seeds})"


def quality_at_budget(a: dict[int, list[Rung]], b: dict[int, list[Rung]]) -> list[dict]:
    """Per rung: A's and B's quality over seeds and how many seeds of A beat the same seed of B at that
    budget (lower is better)."""
    sa, sb = {r["k"]: r for r in rung_stats(a)}, {r["k"]: r for r in rung_stats(b)}
    rows = []
    for k in sorted(set(sa) & set(sb)):
        pairs = [(ra.value, rb.value) for s in set(a) & set(b) for ra in a[s] for rb in b[s] if ra.k == rb.k == k]
        rows.append({"k": k, "a": sa[k]["value"], "b": sb[k]["value"],
                     "a_better": sum(x < y for x, y in pairs), "n": len(pairs)})
    return rows
