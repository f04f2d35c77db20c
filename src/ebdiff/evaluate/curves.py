"""Does a training mode learn like the reference? Loss curves compared against a seed-noise floor.

The diffusion loss of one step depends mostly on its random timestep, so two runs that differ only
in their seed already give logged losses a few percent apart. "The fast path's curve matches fp32
within bf16 noise" is therefore decided against that floor: the candidate's mean relative distance
to the reference curve, over the logged points after `after` iterations, must be at most
`tolerance` times the mean relative distance between two runs of one mode that differ only in
their seed. The signed mean difference (`bias`: positive = the candidate's loss is higher) is
reported beside it. Pure logic: curves are {iteration: logged loss} dicts (`read_curve` loads
one from a run's metrics.jsonl).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOLERANCE = 1.5  # the two distances estimate one quantity when only randomness differs; ~30 points each


def read_curve(run: str | Path) -> dict[int, float]:
    """{iteration: loss} from a run folder's metrics.jsonl (empty if it has none)."""
    from ..runs.checkpoint import METRICS_FILE, read_records

    return {int(r["iter"]): float(r["loss"]) for r in read_records(Path(run) / METRICS_FILE) if "loss" in r}


def distance(ref: dict[int, float], other: dict[int, float], after: int = 0) -> dict:
    """Relative differences (other - ref) / ref at the iterations both curves logged, past `after`."""
    its = sorted(i for i in set(ref) & set(other) if i > after)
    if not its:
        raise ValueError(f"the two curves share no logged iteration after {after}")
    r = np.array([ref[i] for i in its])
    d = (np.array([other[i] for i in its]) - r) / r
    return {"points": len(its), "first": its[0], "last": its[-1], "mean_abs": float(np.abs(d).mean()),
            "max_abs": float(np.abs(d).max()), "bias": float(d.mean())}


def compare(ref: dict[int, float], cand: dict[int, float], noise: tuple[dict[int, float], dict[int, float]],
            after: int = 500, tolerance: float = TOLERANCE) -> dict:
    """Candidate vs reference, judged against the distance between the two seeds in `noise`.

    within_noise: mean |relative difference| of candidate vs reference <= tolerance x that of the
    seed pair. ratio = the former / the latter (about 1 when only randomness differs; below 1 when
    the candidate shares the reference's seed and still follows it)."""
    test, floor = distance(ref, cand, after), distance(noise[0], noise[1], after)
    ratio = test["mean_abs"] / floor["mean_abs"] if floor["mean_abs"] > 0 else float("inf")
    return {"after": after, "tolerance": tolerance, "candidate": test, "seed_noise": floor, "ratio": ratio,
            "within_noise": bool(ratio <= tolerance)}


def format_comparison(name: str, c: dict) -> str:
    t, n = c["candidate"], c["seed_noise"]
    verdict = "within seed noise" if c["within_noise"] else "OUTSIDE seed noise"
    return (f"{name}: mean |rel. diff| {100 * t['mean_abs']:.2f}% (bias {100 * t['bias']:+.2f}%, max "
            f"{100 * t['max_abs']:.1f}%) vs seed-to-seed {100 * n['mean_abs']:.2f}% over {t['points']} points "
            f"after iteration {c['after']}: ratio {c['ratio']:.2f} <= {c['tolerance']}? {verdict}")
