"""The Early-Bird search: which weights are scored, by which criterion, how often, and when it stops.

`EarlyBirdSearch.check(iteration, model, ema)` computes the mask the criterion gives at the ratio on
the mask source's current weights (the online model or its EMA), feeds it to the detector and returns
a `Ticket` when the masks have settled (or when the search budget ran out and `on_miss` says to
extract anyway), else None. It owns its history (masks, iterations, check costs) and saves and
restores it with `state_dict()` / `load_state_dict()`, replaying the detector so that a resumed search
continues exactly. It does not train, prune or write files: `EarlyBirdHook`, on the training loop, does that.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn as nn

from ..backbones import format_count, size_of
from ..core.earlybird import EarlyBirdDetector, Ticket
from ..core.masks import ChannelMask
from ..pruning.engine import Criterion, Plan, PruningEngine, ScoreProbe, cut, kept_entries, make_criterion
from ..runs.facts import TicketInfo
from .hooks import Hook

SEARCHING, DRAWN, MISSED = "searching", "drawn", "missed"


class EarlyBirdSearch:
    def __init__(self, criterion: Criterion, ratio: float, detector: EarlyBirdDetector, check_every: int,
                 mask_source: str = "online", max_search_iters: int | None = None,
                 on_miss: str = "continue-dense", probe: ScoreProbe | None = None, round_channels: int = 1):
        if mask_source not in ("online", "ema"):
            raise ValueError(f"unknown mask source '{mask_source}' (online or ema)")
        if criterion.needs_probe and probe is None:
            raise ValueError(f"criterion '{criterion.name}' scores gradients: it needs a ScoreProbe")
        self.criterion, self.ratio, self.detector = criterion, ratio, detector
        self.check_every, self.mask_source = int(check_every), mask_source
        self.max_search_iters, self.on_miss, self.probe = max_search_iters, on_miss, probe
        self.round_channels = int(round_channels)
        self.masks: list[ChannelMask] = []
        self.iterations: list[int] = []
        self.check_seconds: list[float] = []
        self.status = SEARCHING
        self._engine: PruningEngine | None = None

    @classmethod
    def from_config(cls, eb, check_every: int, seed: int = 0, probe=None) -> "EarlyBirdSearch":
        """From the `early_bird` config section, `check_every` resolved to iterations. `probe`: a
        ScoreProbe, or a function making one, used only when the criterion scores gradients."""
        crit = make_criterion(eb.criterion, seed=seed, diff_threshold=eb.diff_threshold)
        if crit.needs_probe and callable(probe):
            probe = probe()
        return cls(crit, eb.ratio, EarlyBirdDetector(eta=eb.eta, queue=eb.queue), check_every, eb.mask_source,
                   eb.max_search_iters, eb.on_miss, probe if crit.needs_probe else None, eb.round_channels)

    # ------------------------------------------------------------------ checks
    def due(self, iteration: int) -> bool:
        return self.status == SEARCHING and iteration % self.check_every == 0

    def engine_for(self, model: nn.Module) -> PruningEngine:
        """The pruning engine of `model` (traced once per model object)."""
        if self._engine is None or self._engine.model is not model:
            self._engine = PruningEngine(model)
        return self._engine

    def mask_of(self, model: nn.Module) -> ChannelMask:
        return self.engine_for(model).mask(self.criterion, self.ratio, self.probe, multiple=self.round_channels)

    def check(self, iteration: int, model: nn.Module, ema: nn.Module | None = None) -> Ticket | None:
        source = ema if self.mask_source == "ema" else model
        if source is None:
            raise ValueError("mask_source=ema needs the EMA model")
        t0 = time.perf_counter()
        mask = self.mask_of(source)
        self.masks.append(mask)
        self.iterations.append(iteration)
        self.check_seconds.append(time.perf_counter() - t0)
        ticket = self.detector.update(mask)
        if ticket is not None:
            self.status = DRAWN
            return dataclasses.replace(ticket, iteration=iteration)
        if self.max_search_iters is None or iteration < self.max_search_iters:
            return None
        if self.on_miss == "continue-dense":
            self.status = MISSED
            return None
        self.status = DRAWN
        return Ticket(check=self.detector.checks - 1, mask=mask, max_distance=None, iteration=iteration, found=False)

    def engine_for_plan(self) -> PruningEngine:
        """The engine the last check traced (its plans apply to the online model and its EMA alike)."""
        if self._engine is None:
            raise RuntimeError("no check has run yet")
        return self._engine

    def plan(self, mask: ChannelMask) -> Plan:
        return self.engine_for_plan().plan(mask)

    def release(self) -> None:
        """Drop the traced engine (after the ticket: the dense model it traced is gone)."""
        self._engine = None

    @property
    def last_distance(self) -> float | None:
        d = self.detector.history[-1] if self.detector.history else math.nan
        return None if math.isnan(d) else d

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Tensors and plain values only (it travels in the checkpoint's weights-only state)."""
        bits = torch.stack([m.bits for m in self.masks]) if self.masks else torch.zeros((0, 0), dtype=torch.bool)
        sizes = self.masks[0].sizes if self.masks else ()
        return {"masks": bits, "sizes": list(sizes), "iterations": list(self.iterations),
                "check_seconds": list(self.check_seconds), "status": self.status}

    def load_state_dict(self, state: dict) -> None:
        sizes = tuple(int(s) for s in state["sizes"])
        self.masks = [ChannelMask(b.clone(), sizes) for b in state["masks"]]
        self.iterations = [int(i) for i in state["iterations"]]
        self.check_seconds = [float(c) for c in state["check_seconds"]]
        self.status = state.get("status", SEARCHING)
        self.detector = EarlyBirdDetector(eta=self.detector.eta, queue=self.detector.queue)
        for m in self.masks:  # replay: the same FIFO and history
            self.detector.update(m)

    def cost_summary(self) -> dict:
        return {"check_seconds_mean": float(np.mean(self.check_seconds)) if self.check_seconds else 0.0,
                "check_seconds_max": float(np.max(self.check_seconds)) if self.check_seconds else 0.0}


class EarlyBirdHook(Hook):
    """The Early-Bird training mode on the loop: check on cadence, and on a ticket extract it from the
    online model and train it instead (`ctx.adopt`: a new optimizer, EMA and compiled step; with
    early_bird.carry_state the dense optimizer state and EMA restricted to the kept channels).

    eb: the `early_bird` config section. init_fn: a fresh dense model (early_bird.reinit). artifacts:
    artifacts(run_dir, search, ticket_dict | None) writes the search's files when it ends (the assembly
    layer hands in `report.write_search_artifacts`); None writes none."""

    def __init__(self, search: EarlyBirdSearch, eb, init_fn, artifacts=None):
        self.search, self.eb, self.init_fn, self.artifacts = search, eb, init_fn, artifacts

    def after_step(self, ctx) -> None:
        st, s = ctx.state, self.search
        if st.search is not s or not s.due(st.iteration):
            return
        ticket = s.check(st.iteration, st.model, st.ema.module)
        st.timing.check_s += s.check_seconds[-1]
        ctx.log({"event": "eb_check", "iter": st.iteration, "check": s.detector.checks - 1,
                 "max_distance": s.last_distance, "check_s": s.check_seconds[-1],
                 "pruned_fraction": s.masks[-1].pruned_fraction})
        if ticket is not None:
            self._extract(ctx, ticket)
        elif s.status == MISSED:
            ctx.print(f"no Early-Bird ticket within {self.eb.max_search_iters} iterations (eta={self.eb.eta}); "
                      "continuing dense training")
            st.facts.ticket = TicketInfo.miss(st.iteration, s.detector.checks)
            ctx.log({"event": "eb_miss", "iter": st.iteration})
            st.search = None
            self._artifacts(ctx, None)

    def _extract(self, ctx, ticket: Ticket) -> None:
        st, s = ctx.state, self.search
        t0 = time.perf_counter()
        small = cut(st.model, s.engine_for_plan(), ticket.mask, reinit=self.eb.reinit, init_fn=self.init_fn)
        s.release()
        kept = kept_entries(st.model, small.plan) if self.eb.carry_state else None
        ctx.adopt(small.model.train(), "ticket", small.plan, kept)
        size = size_of(small.model)
        st.timing.extract_s += time.perf_counter() - t0
        st.timing.search_s = st.timing.dense_s
        dense = st.facts.dense_size
        info = TicketInfo(found=ticket.found, check=ticket.check, iteration=ticket.iteration,
                          max_distance=ticket.max_distance, ratio=s.ratio, criterion=s.criterion.name,
                          eta=s.detector.eta, queue=s.detector.queue, check_every=s.check_every,
                          mask_source=s.mask_source, reinit=self.eb.reinit, round_channels=s.round_channels,
                          search_seconds=st.timing.dense_s + st.timing.check_s, **s.cost_summary(),
                          extract_seconds=st.timing.extract_s, dense=dense, ticket=size,
                          pruned_channel_fraction=ticket.mask.pruned_fraction)
        st.facts.ticket = info
        ctx.log({"event": "ticket", **info.to_dict()})
        self._artifacts(ctx, info)
        what = "ticket drawn" if ticket.found else "no ticket in the search budget; extracting anyway"
        ctx.print(f"Early-Bird: {what} at iteration {ticket.iteration} (check {ticket.check}): "
                  f"{format_count(dense['params'])} -> {format_count(size['params'])} params, "
                  f"{format_count(dense['macs'])} -> {format_count(size['macs'])} MACs")

    def _artifacts(self, ctx, info: TicketInfo | None) -> None:
        if ctx.main and self.artifacts is not None:
            self.artifacts(ctx.run_dir, self.search, None if info is None else info.to_dict(),
                           title=f"{self.search.criterion.name} p={self.search.ratio}")

    def on_end(self, ctx) -> None:
        st = ctx.state
        if st.search is self.search and self.search.status == SEARCHING:
            ctx.print(f"no Early-Bird ticket was drawn in {st.iteration} iterations "
                      f"({self.search.detector.checks} checks, eta={self.search.detector.eta})")
            self._artifacts(ctx, None)
