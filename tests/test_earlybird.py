import math

import pytest
import torch

from ebdiff.core.earlybird import EarlyBirdDetector
from ebdiff.core.masks import ChannelMask

N = 100


def mask_with(k):
    """Mask whose first k entries differ from the base mask (base: every second entry pruned)."""
    b = torch.arange(N) % 2 == 0
    b[:k] = ~b[:k]
    return ChannelMask(b, (N,))


def run(detector, ks):
    for i, k in enumerate(ks):
        t = detector.update(mask_with(k))
        if t is not None:
            return i, t
    return None, None


def test_converging_sequence_draws_when_queue_is_within_eta():
    d = EarlyBirdDetector(eta=0.1, queue=5)
    # distances to the newest: k differences; converge to 0 from check 4 on
    i, t = run(d, [50, 40, 30, 20, 9, 5, 3, 0, 0, 0, 0, 0])
    # at check 7 the queue is masks of k=[20,9,5,3,0]: max distance 0.20 -> no; check 8: [9,5,3,0,0] -> 0.09
    assert i == 8 and t.check == 8 and abs(t.max_distance - 0.09) < 1e-9


def test_identical_masks_draw_at_first_full_queue():
    d = EarlyBirdDetector(eta=0.1, queue=3)
    i, t = run(d, [0, 0, 0, 0])
    assert i == 2 and t.max_distance == 0.0
    assert math.isnan(d.history[0]) and math.isnan(d.history[1]) and d.history[2] == 0.0


def test_oscillating_sequence_never_draws():
    d = EarlyBirdDetector(eta=0.1, queue=5)
    i, _ = run(d, [0, 20] * 20)
    assert i is None and d.checks == 40


def test_too_short_never_draws():
    d = EarlyBirdDetector(eta=0.5, queue=5)
    i, _ = run(d, [0, 0, 0, 0])
    assert i is None


def test_threshold_is_strict_and_compares_with_every_queued_mask():
    d = EarlyBirdDetector(eta=0.1, queue=3)
    i, _ = run(d, [10, 0, 0])       # oldest differs by exactly 0.1: not < eta
    assert i is None
    d = EarlyBirdDetector(eta=0.1, queue=3)
    i, _ = run(d, [9, 0, 0])
    assert i == 2


def test_fifo_forgets_old_masks():
    d = EarlyBirdDetector(eta=0.1, queue=2)
    i, _ = run(d, [50, 0, 0])
    assert i == 2


@pytest.mark.parametrize("kw", [dict(eta=0), dict(eta=-1), dict(queue=1), dict(queue=0), dict(queue=2.5)])
def test_bad_settings(kw):
    with pytest.raises(ValueError):
        EarlyBirdDetector(**kw)
