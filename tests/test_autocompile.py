import math

import pytest

from ebdiff.training.autocompile import DEFAULT_HIT_S, DEFAULT_MISS_S, EXPECTED_COMPILED_RATIO, decide_compile, estimate


def test_compiles_only_when_the_planned_iterations_repay_the_compilation():
    # the H200's dense cifar10 step: 70.9 ms uncompiled (bf16 + channels_last), 27.6 ms compiled, 90 s to compile
    short = decide_compile(1500, 0.0709, 0.0276, 90.0)   # 1,500 x 43.3 ms = 65 s < 90 s
    assert not short.compile and "<= 90 s" in short.reason
    assert short.saving_s == pytest.approx(1500 * 0.0433)
    assert short.break_even_iters == pytest.approx(90.0 / 0.0433)
    long = decide_compile(2500, 0.0709, 0.0276, 90.0)    # 108 s > 90 s
    assert long.compile and "break-even at 2079 iterations" in long.reason
    assert decide_compile(1500, 0.0709, 0.0276, 11.0).compile  # the same run with the shape in the cache
    assert not decide_compile(2500, 0.0709, 0.0276, 90.0, margin=2.0).compile


def test_a_compiled_step_that_is_not_faster_never_compiles():
    d = decide_compile(10**9, 0.10, 0.12, 0.0)
    assert not d.compile and d.break_even_iters == math.inf and "not faster" in d.reason
    assert not decide_compile(0, 0.10, 0.05, 1.0).compile
    with pytest.raises(ValueError):
        decide_compile(-1, 0.1, 0.05, 1.0)
    with pytest.raises(ValueError):
        decide_compile(10, 0.1, 0.05, 1.0, margin=0)


def test_estimates_from_records_and_defaults():
    # a GPU without records: the H200's compiled/uncompiled ratio and its 72-93 s compilation
    step, comp, src = estimate(0.1, {}, gpu=True, cached=False)
    assert step == pytest.approx(EXPECTED_COMPILED_RATIO * 0.1) and comp == DEFAULT_MISS_S
    assert "expected" in src
    assert estimate(0.1, {}, gpu=True, cached=True)[1] == DEFAULT_HIT_S
    # measured records win
    rec = {"step_s": 0.03, "compile_miss_s": 71.0, "compile_hit_s": 9.5}
    assert estimate(0.1, rec, gpu=True, cached=False)[:2] == (0.03, 71.0)
    assert estimate(0.1, rec, gpu=True, cached=True)[:2] == (0.03, 9.5)
    # the CPU has no expected figures; the whole-step graph none for its compiled step
    assert estimate(0.1, {}, gpu=False, cached=False)[:2] == (None, None)
    assert estimate(0.1, {}, gpu=True, cached=False, graph=True)[0] is None
    assert estimate(0.1, rec, gpu=False, cached=True)[:2] == (0.03, 9.5)
