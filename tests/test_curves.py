import json

import numpy as np
import pytest

from ebdiff.evaluate.curves import compare, distance, format_comparison, read_curve


def _curve(seed, scale=0.03, bias=0.0, iters=range(50, 2001, 50)):
    """A decaying loss curve with multiplicative logging noise (a stand-in for a seed's randomness)."""
    rng = np.random.default_rng(seed)
    return {i: (0.03 + 0.3 / np.sqrt(i)) * (1 + bias + scale * rng.standard_normal()) for i in iters}


def test_distance_uses_shared_points_after_the_cut():
    ref = {100: 1.0, 200: 2.0, 300: 4.0, 400: 1.0}
    other = {200: 2.2, 300: 3.6, 500: 9.0}
    d = distance(ref, other, after=100)
    assert d["points"] == 2 and (d["first"], d["last"]) == (200, 300)
    assert d["mean_abs"] == pytest.approx(0.1) and d["max_abs"] == pytest.approx(0.1)
    assert d["bias"] == pytest.approx(0.0)  # +10% and -10%
    with pytest.raises(ValueError, match="share no logged iteration"):
        distance(ref, other, after=300)


def test_a_run_that_differs_only_by_its_randomness_is_within_noise():
    c = compare(_curve(12), _curve(13), (_curve(14), _curve(15)))  # ratio 1.04 for these seeds
    assert 0.6 < c["ratio"] < 1.5 and c["within_noise"]
    assert c["candidate"]["points"] == 30  # logged points after iteration 500


def test_a_biased_run_is_outside_noise_and_its_bias_is_reported():
    c = compare(_curve(12), _curve(13, bias=0.10), (_curve(14), _curve(15)))
    assert not c["within_noise"] and c["ratio"] > 2
    assert c["candidate"]["bias"] == pytest.approx(0.10, abs=0.02)
    assert "OUTSIDE seed noise" in format_comparison("fast", c)


def test_identical_curves_and_a_zero_noise_floor():
    a = _curve(0)
    assert compare(a, dict(a), (_curve(2), _curve(3)))["ratio"] == 0.0
    assert not compare(a, _curve(1), (a, dict(a)))["within_noise"]  # no floor: any difference is outside


def test_read_curve_skips_records_without_a_loss(tmp_path):
    recs = [{"iter": 20, "loss": 0.5}, {"event": "ticket", "iter": 30}, {"iter": 40, "loss": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert read_curve(tmp_path) == {20: 0.5, 40: 0.25}
    assert read_curve(tmp_path / "missing") == {}
