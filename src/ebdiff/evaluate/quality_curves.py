"""Time to quality: how long each method trains before its samples reach a given quality.

A curve is a run's evaluation points during training (`training_eval`), as `Point(train_s, value,
iteration)` sorted by training time; lower values are better (FD, FID). Definitions (pure logic):

- **reaches a target** at the first evaluated point whose value is at or below it: the time of that
  point. With `interpolate=True`, the crossing is placed by linear interpolation between that point
  and the one before it (a point at the target gives its own time; the first point of a curve has no
  point before it and gives its own time). Nothing is extrapolated: a curve whose points all lie
  above the target never reaches it (None), however close its trend comes.
- **the reference's final quality** is the value of the reference run's last point; the reference's
  own time to it is measured the same way (its curve may dip below its final value earlier).
- **speed-up at equal quality** = the reference's time to the target / the method's time to it.
- **the paper's speed-up** = the reference's training time / the method's (equal iteration budgets,
  whatever quality each ends at), as the report's table shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Point:
    train_s: float
    value: float
    iteration: int = 0


def time_to_target(points: list[Point], target: float, interpolate: bool = False) -> float | None:
    """Training seconds at which a curve first reaches `target` (value <= target), None if it never does."""
    pts = sorted(points, key=lambda p: p.train_s)
    for i, p in enumerate(pts):
        if p.value <= target:
            if not interpolate or i == 0 or p.value == target:
                return p.train_s
            q = pts[i - 1]  # above the target: the crossing lies between q and p
            return q.train_s + (q.value - target) / (q.value - p.value) * (p.train_s - q.train_s)
    return None


def best_point(points: list[Point]) -> Point | None:
    return min(points, key=lambda p: (p.value, p.train_s)) if points else None


def time_to_quality(curves: dict[str, list[Point]], reference: str, target: float | None = None,
                    interpolate: bool = False, train_s: dict[str, float | None] | None = None) -> dict:
    """For each curve: its time to the reference's final quality and to `target`, with the speed-ups at
    equal quality (reference time / its time) and the paper's speed-up (reference training time / its
    training time, from `train_s`, each run's whole training time; None where unknown).

    Returns {"reference", "reference_final", "target", "interpolate", "rows": [...]}, one row per curve
    in the given order: name, points, final (value, train_s), best (value, train_s), to_reference_s,
    speedup_at_reference, to_target_s, speedup_at_target, train_s, paper_speedup."""
    train_s = train_s or {}
    ref = sorted(curves.get(reference) or [], key=lambda p: p.train_s)
    ref_final = ref[-1].value if ref else None
    ref_to_final = time_to_target(ref, ref_final, interpolate) if ref else None
    ref_to_target = time_to_target(ref, target, interpolate) if ref and target is not None else None
    ref_train = train_s.get(reference)

    def ratio(a, b):
        return a / b if a is not None and b else None

    rows = []
    for name, pts in curves.items():
        pts = sorted(pts, key=lambda p: p.train_s)
        best = best_point(pts)
        to_ref = time_to_target(pts, ref_final, interpolate) if pts and ref_final is not None else None
        to_target = time_to_target(pts, target, interpolate) if pts and target is not None else None
        rows.append({
            "name": name, "points": len(pts),
            "final": {"value": pts[-1].value, "train_s": pts[-1].train_s} if pts else None,
            "best": {"value": best.value, "train_s": best.train_s} if best else None,
            "to_reference_s": to_ref, "speedup_at_reference": ratio(ref_to_final, to_ref),
            "to_target_s": to_target, "speedup_at_target": ratio(ref_to_target, to_target),
            "train_s": train_s.get(name), "paper_speedup": ratio(ref_train, train_s.get(name)),
        })
    return {"reference": reference, "reference_final": ref_final, "reference_to_final_s": ref_to_final,
            "target": target, "reference_to_target_s": ref_to_target, "interpolate": interpolate, "rows": rows}


def read_quality_curve(run: str | Path) -> tuple[list[Point], str | None]:
    """A run's evaluation points during training (its metrics.jsonl `eval` records; for a TA-EB run the
    ensemble's) and the metric's name."""
    from ..runs.checkpoint import METRICS_FILE, read_records

    recs = [r for r in read_records(Path(run) / METRICS_FILE) if r.get("event") == "eval" and "value" in r]
    pts = sorted((Point(float(r["train_s"]), float(r["value"]), int(r["iter"])) for r in recs),
                 key=lambda p: p.train_s)
    return pts, (recs[-1].get("metric") if recs else None)


def verdict(ttq: dict, reference: str, other: str, metric: str, labels: dict[str, str] | None = None) -> str:
    """One line: which of two runs trained for the same time reached the better final quality (lower
    is better), and when `other` reached the reference's final quality, if it did."""
    labels = labels or {}
    rows = {r["name"]: r for r in ttq["rows"]}
    a, b = rows[reference], rows[other]
    la, lb = labels.get(reference, reference), labels.get(other, other)
    if not a["final"] or not b["final"]:
        return f"no evaluation points for {la if not a['final'] else lb}: nothing to compare"
    va, vb = a["final"]["value"], b["final"]["value"]
    ta, tb = a["final"]["train_s"], b["final"]["train_s"]
    win = lb if vb < va else la if va < vb else None
    head = (f"{win} reached the better {metric}" if win else f"both reached the same {metric}") + \
        f" in the same training time: {lb} {vb:.2f} after {tb:.0f} s, {la} {va:.2f} after {ta:.0f} s (lower is better)"
    t = b["to_reference_s"]
    if t is not None and b["speedup_at_reference"]:
        head += f"; {lb} reached {la}'s final {metric} after {t:.0f} s (speed-up at equal quality {b['speedup_at_reference']:.2f}x)"
    return head
