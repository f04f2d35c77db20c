"""Timestep regions for TA-EB tickets: validation, routing, weighted sizes, and the RegionRouter.

Pure logic except `RegionRouter`, which is an eps-model callable over the region models (so the
samplers take it like any single model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import ConfigError

ROUTES = ("higher-noise", "midpoint")


class RegionError(ConfigError):
    pass


@dataclass(frozen=True)
class Region:
    lo: int  # first timestep (inclusive)
    hi: int  # last timestep (inclusive)
    ratio: float
    iters: int | None = None  # training budget of this branch (None = train.iters)
    eta: float | None = None  # detector threshold of this branch (None = early_bird.eta)

    def to_dict(self) -> dict:
        d = {"t": [self.lo, self.hi], "ratio": self.ratio}
        if self.iters is not None:
            d["iters"] = self.iters
        if self.eta is not None:
            d["eta"] = self.eta
        return d


@dataclass(frozen=True)
class RegionSet:
    regions: tuple[Region, ...]
    T: int = 1000

    def __post_init__(self):
        validate_regions(self.regions, self.T)

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, i: int) -> Region:
        return self.regions[i]

    @classmethod
    def from_config(cls, items: Sequence[dict], T: int = 1000) -> "RegionSet":
        regs = []
        for k, it in enumerate(items):
            if not isinstance(it, dict) or "t" not in it or "ratio" not in it:
                raise RegionError(f"region {k}: expected {{t: [lo, hi], ratio: r}}, got {it!r}")
            unknown = set(it) - {"t", "ratio", "iters", "eta"}
            if unknown:
                raise RegionError(f"region {k}: unknown key(s) {', '.join(sorted(unknown))}")
            t = it["t"]
            if not (isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(v, int) for v in t)):
                raise RegionError(f"region {k}: t must be [lo, hi] integers, got {t!r}")
            if not isinstance(it["ratio"], (int, float)) or isinstance(it["ratio"], bool):
                raise RegionError(f"region {k}: ratio must be a number, got {it['ratio']!r}")
            iters, eta = it.get("iters"), it.get("eta")
            if iters is not None and (not isinstance(iters, int) or iters <= 0):
                raise RegionError(f"region {k}: iters must be a positive integer, got {iters!r}")
            if eta is not None and (not isinstance(eta, (int, float)) or eta <= 0):
                raise RegionError(f"region {k}: eta must be > 0, got {eta!r}")
            regs.append(Region(int(t[0]), int(t[1]), float(it["ratio"]), iters, None if eta is None else float(eta)))
        return cls(tuple(regs), T)

    @classmethod
    def from_boundaries(cls, boundaries: Sequence[int], ratios: Sequence[float], T: int = 1000,
                        overlap: float = 0.02) -> "RegionSet":
        """Regions split at `boundaries`, each boundary widened by overlap*T/2 on either side
        (the paper: boundaries 250, 450 with 2% -> [0, 260], [240, 460], [440, 999])."""
        if len(ratios) != len(boundaries) + 1:
            raise RegionError(f"{len(boundaries)} boundaries need {len(boundaries) + 1} ratios, got {len(ratios)}")
        if overlap < 0:
            raise RegionError(f"overlap must be >= 0, got {overlap}")
        half = int(round(overlap * T / 2))
        edges = [0, *boundaries, T]
        regs = []
        for k, r in enumerate(ratios):
            lo = edges[k] - half if k > 0 else 0
            # the paper's inclusive ends: boundary 250 with 2% -> [.., 260] and [240, ..]; 0% -> [.., 249], [250, ..]
            hi = edges[k + 1] + half - (0 if half else 1) if k < len(ratios) - 1 else T - 1
            regs.append(Region(max(0, lo), min(T - 1, hi), float(r)))
        return cls(tuple(regs), T)

    def to_config(self) -> list[dict]:
        return [r.to_dict() for r in self.regions]

    # ------------------------------------------------------------------ routing
    def switch_points(self, rule: str = "higher-noise") -> list[int]:
        """t at which routing moves from region k to region k+1 (one per boundary)."""
        if rule not in ROUTES:
            raise RegionError(f"unknown routing rule '{rule}' (known: {', '.join(ROUTES)})")
        pts = []
        for a, b in zip(self.regions, self.regions[1:]):
            pts.append(b.lo if rule == "higher-noise" else (b.lo + a.hi + 1) // 2)
        return pts

    def route(self, t: int, rule: str = "higher-noise") -> int:
        if not 0 <= t < self.T:
            raise ValueError(f"timestep {t} outside 0..{self.T - 1}")
        k = 0
        for p in self.switch_points(rule):
            if t >= p:
                k += 1
        return k

    def weighted(self, values: Sequence[float], timesteps: Sequence[int], rule: str = "higher-noise") -> float:
        """Average of per-region `values` over the timesteps a sampler visits (TA-EB params/MACs)."""
        if len(values) != len(self.regions):
            raise ValueError("one value per region is needed")
        if not timesteps:
            raise ValueError("no timesteps")
        return sum(values[self.route(int(t), rule)] for t in timesteps) / len(timesteps)

    def steps_per_region(self, timesteps: Sequence[int], rule: str = "higher-noise") -> list[int]:
        counts = [0] * len(self.regions)
        for t in timesteps:
            counts[self.route(int(t), rule)] += 1
        return counts


def validate_regions(regions: Sequence[Region], T: int) -> None:
    if not regions:
        raise RegionError("a region set needs at least one region")
    for k, r in enumerate(regions):
        if not 0 <= r.lo <= r.hi:
            raise RegionError(f"region {k}: t = [{r.lo}, {r.hi}] is not a range of timesteps")
        if r.hi > T - 1:
            raise RegionError(f"region {k}: t = [{r.lo}, {r.hi}] exceeds T-1 = {T - 1} (diffusion.timesteps = {T})")
        if not 0.0 < r.ratio < 1.0:
            raise RegionError(f"region {k}: ratio must be in (0, 1), got {r.ratio}")
    if regions[0].lo != 0:
        raise RegionError(f"regions must start at t = 0; the first starts at {regions[0].lo}")
    if regions[-1].hi != T - 1:
        raise RegionError(f"regions must end at t = T-1 = {T - 1}; the last ends at {regions[-1].hi} "
                          f"(diffusion.timesteps = {T})")
    for k, (a, b) in enumerate(zip(regions, regions[1:])):
        if not (b.lo > a.lo and b.hi > a.hi):
            raise RegionError(f"regions must be sorted by t: region {k + 1} [{b.lo}, {b.hi}] does not follow "
                              f"region {k} [{a.lo}, {a.hi}]")
        if b.lo > a.hi + 1:
            raise RegionError(f"gap between region {k} (ends {a.hi}) and region {k + 1} (starts {b.lo}): "
                              f"timesteps {a.hi + 1}..{b.lo - 1} belong to no region")
    for k in range(1, len(regions) - 1):
        a, b = regions[k - 1], regions[k + 1]
        if (regions[k].lo + a.hi + 1) // 2 >= (b.lo + regions[k].hi + 1) // 2:
            raise RegionError(f"region {k} is swallowed by its neighbours' overlaps (no timestep of its own)")


class RegionRouter:
    """eps-model callable: each timestep goes to exactly one region model (k-diffusion style wrapper)."""

    def __init__(self, models: Sequence[Callable], regions: RegionSet, rule: str = "higher-noise"):
        if len(models) != len(regions):
            raise RegionError(f"{len(regions)} regions need {len(regions)} models, got {len(models)}")
        regions.switch_points(rule)  # validates the rule
        self.models, self.regions, self.rule = list(models), regions, rule
        self.calls = [0] * len(models)

    def at(self, t: int) -> Callable:
        """The model serving timestep t. The samplers call this with the step's Python int, so that
        routing needs no read-back of a device tensor (a host-device sync per sampling step)."""
        k = self.regions.route(int(t), self.rule)
        self.calls[k] += 1
        return self.models[k]

    def map(self, wrap: Callable[[Callable], Callable]) -> "RegionRouter":
        """Wrap every region model (bf16 autocast, compilation, padding) and keep the router outermost."""
        self.models = [wrap(m) for m in self.models]
        return self

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *cond) -> torch.Tensor:
        """cond: class labels (one per sample) of a class-conditional ensemble, split with the batch."""
        ks = [self.regions.route(int(v), self.rule) for v in t.tolist()]
        if all(k == ks[0] for k in ks):  # the samplers' case: one t per batch
            self.calls[ks[0]] += 1
            return self.models[ks[0]](x, t, *cond)
        out = None
        kt = torch.tensor(ks, device=t.device)
        for k in sorted(set(ks)):
            sel = kt == k
            self.calls[k] += 1
            y = self.models[k](x[sel], t[sel], *[c if c is None else c[sel] for c in cond])
            if out is None:
                out = torch.empty((x.shape[0], *y.shape[1:]), dtype=y.dtype, device=y.device)
            out[sel] = y
        return out

    def to_dict(self) -> dict:
        return {"T": self.regions.T, "route": self.rule, "regions": self.regions.to_config()}

