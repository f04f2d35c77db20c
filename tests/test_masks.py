import math

import pytest
import torch

from ebdiff.core.masks import ChannelMask, channels_to_prune, distance_matrix, hamming, select_pruned


def m(bits, sizes=None):
    b = torch.tensor(bits, dtype=torch.bool)
    return ChannelMask(b, tuple(sizes or [len(bits)]))


def test_hamming_hand_made():
    a = m([1, 0, 0, 1, 0, 0, 0, 0], [4, 4])
    b = m([1, 1, 0, 1, 0, 0, 0, 1], [4, 4])
    assert hamming(a, a) == 0.0
    assert hamming(a, b) == 2 / 8
    c = m([0, 1, 1, 0, 1, 1, 1, 1], [4, 4])
    assert hamming(a, c) == 1.0
    d = distance_matrix([a, b, c])
    assert d.shape == (3, 3) and torch.allclose(d, d.T) and torch.all(d.diagonal() == 0)
    assert d[0, 1].item() == 0.25 and d[0, 2].item() == 1.0 and d[1, 2].item() == 0.75


def test_mismatched_groups_rejected():
    with pytest.raises(ValueError):
        hamming(m([1, 0, 0, 1], [2, 2]), m([1, 0, 0, 1], [4]))
    with pytest.raises(ValueError):
        ChannelMask(torch.zeros(3, dtype=torch.bool), (2, 2))


def test_indices_round_trip():
    a = ChannelMask.from_indices([3, 5], [torch.tensor([2]), torch.tensor([0, 4])])
    assert a.bits.tolist() == [0, 0, 1, 1, 0, 0, 0, 1]
    assert [i.tolist() for i in a.indices()] == [[2], [0, 4]]
    assert a.pruned_fraction == 3 / 8


def test_ratio_rule_reproduces_reference():
    # reference: n = C - int(C(1-p)) due, n // G pruned in each of the G GroupNorm groups
    assert channels_to_prune(128, 0.3, 32) == 32   # 1 per group of 4
    assert channels_to_prune(256, 0.3, 32) == 64   # 2 per group of 8
    assert channels_to_prune(128, 0.5, 32) == 64
    assert channels_to_prune(256, 0.8, 32) == 192
    assert channels_to_prune(128, 0.1, 32) == 0
    assert channels_to_prune(512, 0.3, 1) == 154
    assert channels_to_prune(8, 0.99, 1) == 7       # one channel always survives
    for size, g in ((128, 32), (256, 32), (512, 1), (48, 8)):
        counts = [channels_to_prune(size, r / 100, g) for r in range(0, 100)]
        assert counts == sorted(counts)


def test_select_pruned_inside_each_norm_group():
    scores = torch.tensor([4., 3, 2, 1, 10, 20, 30, 40])
    idx = select_pruned(scores, 0.5, gn_groups=2)
    assert idx.tolist() == [2, 3, 4, 5]
    assert select_pruned(scores, 0.5, gn_groups=1).tolist() == [0, 1, 2, 3]
    ties = torch.zeros(8)
    assert select_pruned(ties, 0.5, 2).tolist() == [0, 1, 4, 5]


def test_round_channels_keeps_multiples_and_defaults_to_the_reference_rule():
    for size, g in ((128, 32), (256, 32), (512, 1), (256, 1), (48, 8), (64, 1)):
        for r in range(0, 100, 3):
            assert channels_to_prune(size, r / 100, g, 1) == channels_to_prune(size, r / 100, g)
            for m in (8, 16):
                keep = size - channels_to_prune(size, r / 100, g, m)
                unit = math.lcm(m, g)
                if r and keep != size:
                    assert keep % unit == 0 and keep >= unit, (size, g, r, m, keep)
    assert channels_to_prune(256, 0.3, 1, 8) == 256 - 176   # 179 survivors -> 176 (nearest multiple of 8)
    assert channels_to_prune(256, 0.8, 1, 16) == 256 - 48   # 51 -> 48
    assert channels_to_prune(256, 0.99, 1, 16) == 256 - 16  # never below one multiple (3 -> 16)
    assert channels_to_prune(512, 0.3, 1, 16) == 512 - 352  # 358 -> 352
    assert channels_to_prune(128, 0.3, 32, 8) == 32         # GroupNorm groups of 32 already keep multiples of 32
    assert channels_to_prune(48, 0.5, 8, 16) == 16          # 24 survivors, a tie between 16 and 32: keeps 32
    with pytest.raises(ValueError):
        channels_to_prune(64, 0.5, 1, 0)


def test_select_pruned_with_rounding_prunes_alike_in_every_norm_group():
    scores = torch.arange(64, dtype=torch.float)
    idx = select_pruned(scores, 0.8, gn_groups=4, multiple=8)  # 12 survivors (3 per norm group) -> 16
    assert len(idx) == 48
    assert [int(((idx >= 16 * k) & (idx < 16 * (k + 1))).sum()) for k in range(4)] == [12, 12, 12, 12]
