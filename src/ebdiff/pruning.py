"""The one module that talks to torch-pruning: groups, criteria, plans, extraction and replay.

`PruningEngine(model)` traces the model once and keeps its prunable groups. Each `mask(...)` call
scores the groups on the model's current weights (on its device) and returns the `ChannelMask` the
criterion would prune at a ratio, without touching the model. `extract(model, plan)` returns a
physically smaller copy that keeps the surviving weights; the same plan replayed onto a fresh
preset (`apply_plan`) rebuilds the architecture for loading safetensors weights (no pickle).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .diffusion import Schedule, q_sample
from .masks import ChannelMask, select_pruned

CRITERIA = ("magnitude", "taylor", "diff-pruning", "random")
GRADIENT_CRITERIA = ("taylor", "diff-pruning")  # scored from the .grad of accumulate_taylor_grads
Plan = list[tuple[str, list[int]]]  # (root module name, pruned output-channel indices), in group order


def _tp():
    import torch_pruning as tp

    return tp


def _example(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tracing input: the smallest resolution every down block accepts (the graph does not depend
    on it, and lsun256 traces 16x faster at 64x64 than at 256x256)."""
    c = model.config.in_channels
    res = min(model.config.sample_size, 2 ** len(model.config.block_out_channels))
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(0)  # never touch the global RNG (exact resume)
    return {"sample": torch.randn(1, c, res, res, device=dev, generator=g),
            "timestep": torch.ones((1,), dtype=torch.long, device=dev)}


def build_graph(model: nn.Module):
    """Trace the model in eval mode (dropout must not draw from the global RNG) with gradients on:
    torch-pruning traces autograd, and finds no group at all in a frozen copy such as the EMA."""
    tp = _tp()
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(True)
    try:
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(model, example_inputs=_example(model), verbose=False)
    finally:
        model.train(was_training)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def _ignored(model: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    mods = dict(model.named_modules())
    return [mods[n] for n in names if n in mods]


@dataclass(frozen=True)
class GroupInfo:
    name: str  # root module
    size: int  # channels
    gn_groups: int  # GroupNorm groups coupled to the channels (1 = none)


class PruningEngine:
    """Traces `model` once; scores and masks its groups on demand, on the model's device."""

    def __init__(self, model: nn.Module, ignored: tuple[str, ...] = ("conv_out",)):
        tp = _tp()
        self.model = model
        self.graph = build_graph(model)
        names = {m: n for n, m in model.named_modules()}
        groups = self.graph.get_all_groups(ignored_layers=_ignored(model, ignored), root_module_types=[nn.Conv2d, nn.Linear])
        # canonical order (by root module name): masks of two engines over the same preset compare
        self.groups = sorted(groups, key=lambda g: names[g[0].dep.target.module])
        if not self.groups:
            raise RuntimeError("torch-pruning found no prunable group in the model")
        info = []
        for g in self.groups:
            root = g[0].dep.target.module
            gns = {d.target.module.num_groups for d, _ in g if isinstance(d.target.module, nn.GroupNorm)}
            size = self.graph.get_out_channels(root)
            info.append(GroupInfo(names[root], int(size), max(gns) if gns else 1))
        self.info = info
        self.sizes = tuple(i.size for i in info)
        self._magnitude = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)
        self._taylor = tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def scores(self, criterion: str, seed: int = 0) -> list[torch.Tensor]:
        """One score per channel of every group (higher = keep). Taylor-type criteria read `.grad`."""
        if criterion == "random":
            g = torch.Generator().manual_seed(seed)
            return [torch.rand(i.size, generator=g) for i in self.info]
        imp = self._magnitude if criterion == "magnitude" else self._taylor
        out = []
        for grp, i in zip(self.groups, self.info):
            s = imp(grp)
            if s is None or s.numel() != i.size:  # e.g. a group without gradients
                s = torch.zeros(i.size, device=next(self.model.parameters()).device)
            out.append(s.float())
        return out

    def mask_from_scores(self, scores: list[torch.Tensor], ratio: float) -> ChannelMask:
        pruned = [select_pruned(s, ratio, i.gn_groups) for s, i in zip(scores, self.info)]
        return ChannelMask.from_indices(self.sizes, pruned)

    def mask(self, criterion: str, ratio: float, seed: int = 0) -> ChannelMask:
        return self.mask_from_scores(self.scores(criterion, seed), ratio)

    def plan(self, mask: ChannelMask) -> Plan:
        return [(i.name, idx.tolist()) for i, idx in zip(self.info, mask.indices())]


# ---------------------------------------------------------------------- Taylor gradients
def accumulate_taylor_grads(model: nn.Module, schedule: Schedule, x0: torch.Tensor, n_timesteps: int,
                            diff_threshold: float | None = None, seed: int = 0,
                            t_range: tuple[int, int] | None = None) -> dict:
    """Accumulate dL_t/dw into `.grad` over evenly spaced t (one batch, fixed noise, same t per batch).

    With `diff_threshold` (Diff-Pruning) the accumulation stops at the first t, in ascending order,
    whose loss falls below threshold * the largest loss seen. The model is put in eval mode while
    scoring (no dropout), so an unchanged model always gives the same scores.
    """
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    g = torch.Generator(device=x0.device).manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, device=x0.device)
    lo, hi = t_range or (0, schedule.T - 1)
    ts = sorted(set(torch.linspace(lo, hi, min(n_timesteps, hi - lo + 1)).round().long().tolist()))
    used, lmax = 0, 0.0
    for t in ts:
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        xt = q_sample(schedule, x0, tt, noise)
        loss = (model(xt, tt).sample - noise).pow(2).mean()
        lv = float(loss.detach())
        lmax = max(lmax, lv)
        if diff_threshold is not None and lv < diff_threshold * lmax:
            break
        loss.backward()
        used += 1
    model.train(was_training)
    return {"timesteps_used": used, "timesteps_planned": len(ts)}


# ---------------------------------------------------------------------- extraction and replay
def fix_stale_attributes(model: nn.Module) -> None:
    """Upsample2D/Downsample2D keep their pre-pruning `channels`; set them from their conv."""
    for m in model.modules():
        cls = type(m).__name__
        if cls in ("Upsample2D", "Downsample2D"):
            conv = getattr(m, "conv", None)
            if isinstance(conv, nn.Conv2d):
                m.channels = conv.in_channels
                m.out_channels = conv.out_channels


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Prune `model` in place by a plan (group order matters: each group's indices are its own)."""
    graph = build_graph(model)
    mods = dict(model.named_modules())
    for name, idxs in plan:
        if not idxs:
            continue
        if name not in mods:
            raise KeyError(f"pruning plan names unknown module '{name}'")
        module = mods[name]
        fn = graph.get_pruner_of_module(module).prune_out_channels
        graph.get_pruning_group(module, fn, idxs).prune()
    fix_stale_attributes(model)
    return model


def extract(model: nn.Module, plan: Plan, reinit: bool = False,
            init_fn: Callable[[], nn.Module] | None = None) -> nn.Module:
    """A physically smaller copy of `model` keeping the surviving weights (or re-initialised)."""
    small = apply_plan(copy.deepcopy(model), plan)
    if reinit:
        if init_fn is None:
            raise ValueError("reinit needs init_fn (a fresh dense model of the same preset)")
        fresh = apply_plan(init_fn().to(next(model.parameters()).device), plan)
        small.load_state_dict(fresh.state_dict())
    return small


def channel_zero_mask_(model: nn.Module, engine: PruningEngine, mask: ChannelMask) -> None:
    """Zero every weight coupled to a pruned channel in `model` (the 'masked dense' model; tests)."""
    for grp, idx in zip(engine.groups, mask.indices()):
        if len(idx) == 0:
            continue
        root = grp[0].dep.target.module
        fn = engine.graph.get_pruner_of_module(root).prune_out_channels
        sub = engine.graph.get_pruning_group(root, fn, idx.tolist())
        for dep, didx in sub:
            mod = dep.target.module
            ids = torch.as_tensor([int(i) for i in didx], dtype=torch.long)
            if not isinstance(mod, nn.Module):
                continue
            w = getattr(mod, "weight", None)
            if w is None:
                continue
            out = engine.graph.is_out_channel_pruning_fn(dep.handler)
            with torch.no_grad():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    if out:
                        w[ids] = 0
                        if mod.bias is not None:
                            mod.bias[ids] = 0
                    else:
                        w[:, ids] = 0
                elif isinstance(mod, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)):
                    w[ids] = 0
                    if mod.bias is not None:
                        mod.bias[ids] = 0
