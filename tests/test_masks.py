import pytest
import torch

from ebdiff.masks import ChannelMask, channels_to_prune, distance_matrix, hamming, select_pruned


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
