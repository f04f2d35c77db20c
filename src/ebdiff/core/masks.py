"""Structured channel masks, the ratio rule and Hamming distances (pure tensor code).

A `ChannelMask` has one entry per channel of every prunable group, concatenated in group order,
1 = pruned (the reference's definition: 12,032 entries for the cifar10 UNet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def channels_to_prune(size: int, ratio: float, gn_groups: int = 1, multiple: int = 1) -> int:
    """How many channels a group of `size` loses at `ratio`.

    The paper's models come from the reference's rule: n = size - int(size * (1 - ratio)) channels
    are due, and a group coupled to a GroupNorm with G groups loses n // G channels inside *each* of
    its G norm groups (so GroupNorm stays valid and every norm group shrinks alike). For the cifar10
    preset this gives 19.8M / 3.4G at ratio 0.3 and 9.0M / 1.5G at 0.5, and the count never falls as
    the ratio rises, so params and MACs fall monotonically. At least one channel always survives.

    `multiple` > 1 (`early_bird.round_channels`, for the tensor cores) then rounds the surviving
    count to the nearest multiple of `multiple` (of lcm(multiple, G) for a GroupNorm-coupled group,
    so that every norm group keeps the same count), never below one such multiple and never above
    the group; a group that cannot keep a whole multiple, or that loses nothing, is left as it is.
    `multiple` = 1 is the reference's rule unchanged.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1); got {ratio}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1; got {multiple}")
    n = size - int(size * (1.0 - ratio) + 1e-9)
    gn = gn_groups > 1 and size % gn_groups == 0
    if gn:
        per = size // gn_groups
        n = min(n // gn_groups, per - 1) * gn_groups
    else:
        n = min(n, size - 1)
    if multiple == 1 or n == 0:
        return n
    unit = math.lcm(multiple, gn_groups) if gn else multiple
    top = size // unit * unit  # the largest multiple the group can keep
    if top == 0:
        return n
    keep = int((size - n) / unit + 0.5) * unit  # nearest multiple, a tie keeps more
    return size - max(unit, min(keep, top))


def select_pruned(scores: torch.Tensor, ratio: float, gn_groups: int = 1, multiple: int = 1) -> torch.Tensor:
    """Sorted indices of the channels to prune: the lowest scores, ranked inside each norm group.

    Ties break towards the lower index (stable sort), so equal scores give the same mask every time.
    `multiple`: see `channels_to_prune`.
    """
    size = scores.numel()
    n = channels_to_prune(size, ratio, gn_groups, multiple)
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    scores = scores.detach().float().cpu()
    if gn_groups > 1 and size % gn_groups == 0:
        per = size // gn_groups
        k = n // gn_groups
        order = torch.sort(scores.view(gn_groups, per), dim=1, stable=True).indices[:, :k]
        idx = order + torch.arange(gn_groups).unsqueeze(1) * per
        return torch.sort(idx.flatten()).values
    order = torch.sort(scores, stable=True).indices[:n]
    return torch.sort(order).values


@dataclass(frozen=True)
class ChannelMask:
    """bits: bool [total channels], 1 = pruned; sizes: channels per group, in group order."""

    bits: torch.Tensor
    sizes: tuple[int, ...]

    def __post_init__(self):
        if self.bits.dtype != torch.bool or self.bits.ndim != 1:
            raise ValueError("ChannelMask.bits must be a 1-D bool tensor")
        if sum(self.sizes) != self.bits.numel():
            raise ValueError(f"mask has {self.bits.numel()} entries but groups hold {sum(self.sizes)}")

    @classmethod
    def from_indices(cls, sizes: list[int] | tuple[int, ...], pruned: list[torch.Tensor]) -> "ChannelMask":
        if len(sizes) != len(pruned):
            raise ValueError("one index list per group is needed")
        parts = []
        for size, idx in zip(sizes, pruned):
            b = torch.zeros(size, dtype=torch.bool)
            if len(idx):
                b[torch.as_tensor(idx, dtype=torch.long)] = True
            parts.append(b)
        return cls(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool), tuple(int(s) for s in sizes))

    def indices(self) -> list[torch.Tensor]:
        """Pruned channel indices per group."""
        return [p.nonzero().flatten() for p in torch.split(self.bits, list(self.sizes))]

    @property
    def pruned_fraction(self) -> float:
        return float(self.bits.float().mean()) if self.bits.numel() else 0.0

    def distance(self, other: "ChannelMask") -> float:
        return hamming(self, other)


def hamming(a: ChannelMask, b: ChannelMask) -> float:
    """Normalised Hamming distance: the fraction of entries that differ."""
    if a.sizes != b.sizes:
        raise ValueError("masks over different groups cannot be compared")
    if a.bits.numel() == 0:
        return 0.0
    return int((a.bits != b.bits).sum()) / a.bits.numel()


def distance_matrix(masks: list[ChannelMask]) -> torch.Tensor:
    """Pairwise normalised Hamming distances, float64 [n, n]."""
    if not masks:
        return torch.zeros(0, 0, dtype=torch.float64)
    sizes = masks[0].sizes
    if any(m.sizes != sizes for m in masks):
        raise ValueError("masks over different groups cannot be compared")
    bits = torch.stack([m.bits for m in masks]).double()
    # |a xor b| = |a| + |b| - 2 a.b
    dot = bits @ bits.T
    cnt = bits.sum(1)
    d = cnt[:, None] + cnt[None, :] - 2 * dot
    return d / bits.shape[1]
