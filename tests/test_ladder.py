"""Budget ladders over seeds (evaluate.ladder): spread, time to a quality between rungs, the speed-up at
equal quality and size seed by seed, and the verdict lines, with exact numbers."""

import pytest

from ebdiff.evaluate.ladder import Rung, equal_quality, quality_at_budget, rung_stats, spread, time_to, verdict


def test_spread():
    assert spread([]) == {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    assert spread([3.0]) == {"n": 1, "mean": 3.0, "sd": 0.0, "min": 3.0, "max": 3.0}
    s = spread([1, 2, 3, 6])
    assert s["mean"] == 3.0 and s["sd"] == pytest.approx((14 / 3) ** 0.5) and (s["min"], s["max"]) == (1.0, 6.0)


def test_time_to_interpolates_between_rungs_and_never_extrapolates():
    rungs = [Rung(1, 100.0, 10.0), Rung(2, 60.0, 20.0), Rung(3, 50.0, 30.0)]
    assert time_to(rungs, 100.0) == 10.0
    assert time_to(rungs, 80.0) == pytest.approx(15.0)  # halfway from 100 to 60
    assert time_to(rungs, 55.0) == pytest.approx(25.0)
    assert time_to(rungs, 49.0) is None
    assert time_to(rungs, 500.0) == 10.0  # the first rung is already better


def test_equal_quality_pairs_seeds_and_counts_those_that_reach():
    # B (say Scratch) ends at 50 after 40 s; A (say EB) reaches 50 at 20 s in seed 0, never in seed 1
    b = {0: [Rung(1, 90.0, 20.0), Rung(2, 50.0, 40.0)], 1: [Rung(1, 80.0, 20.0), Rung(2, 40.0, 40.0)]}
    a = {0: [Rung(1, 60.0, 10.0), Rung(2, 40.0, 30.0)], 1: [Rung(1, 70.0, 10.0), Rung(2, 45.0, 30.0)],
         2: [Rung(1, 1.0, 1.0)]}
    r = equal_quality(a, b)
    assert r["n"] == 2 and r["reached"] == 1  # seed 2 of A has no B to pair with
    s0, s1 = r["seeds"]
    assert s0["target"] == 50.0 and s0["b_s"] == 40.0 and s0["a_s"] == pytest.approx(20.0)
    assert s0["speedup"] == pytest.approx(2.0)
    assert s1["a_s"] is None and s1["speedup"] is None and s1["a_best"] == 45.0
    line = verdict("EB", "Scratch", r, "FD")
    assert line.startswith("EB reaches Scratch's final FD at the same size in 2.00x less time in 1 of 2 seeds")
    assert "not reached (best 45.0 vs 40.0)" in line
    # B reaching its final value before its top rung counts B's earlier time
    b2 = {0: [Rung(1, 50.0, 20.0), Rung(2, 50.0, 40.0)]}
    assert equal_quality({0: [Rung(1, 50.0, 10.0)]}, b2)["seeds"][0]["speedup"] == pytest.approx(2.0)
    # slower: "more time"
    assert "1.50x more time" in verdict("A", "B", equal_quality({0: [Rung(1, 50.0, 60.0)]}, {0: [Rung(1, 50.0, 40.0)]}),
                                        "FD")
    assert "does not reach" in verdict("A", "B", equal_quality({0: [Rung(1, 99.0, 1.0)]}, b2), "FD")


def test_rung_stats_and_quality_at_budget():
    a = {0: [Rung(1, 10.0, 1.0), Rung(2, 5.0, 2.0)], 1: [Rung(1, 20.0, 3.0), Rung(2, 7.0, 4.0)]}
    b = {0: [Rung(1, 15.0, 1.0), Rung(2, 4.0, 2.0)], 1: [Rung(1, 15.0, 1.0), Rung(2, 8.0, 2.0)]}
    st = rung_stats(a)
    assert [r["k"] for r in st] == [1, 2] and st[0]["value"]["mean"] == 15.0 and st[1]["train_s"]["mean"] == 3.0
    q = quality_at_budget(a, b)
    assert [(r["k"], r["a_better"], r["n"]) for r in q] == [(1, 1, 2), (2, 1, 2)]
