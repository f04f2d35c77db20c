"""The one module that talks to torch-pruning: groups, criteria, plans, extraction and replay.

`PruningEngine(model)` traces the model once and keeps its prunable groups. A `Criterion` (registered
by name in `CRITERIA`; `magnitude`, `taylor`, `diff-pruning`, `random`) scores every channel of every
group on the model's current weights; `engine.mask(criterion, ratio)` turns the scores into the
`ChannelMask` that would be pruned at a ratio, without touching the model. `extract(model, plan)`
returns a physically smaller copy that keeps the surviving weights (or re-initialised ones); the same
plan replayed onto a fresh preset (`apply_plan`) rebuilds the architecture for loading safetensors
weights (no pickle).

Adding a criterion is one class and one decorator:

    @register_criterion
    class FirstChannels(Criterion):
        name = "first-channels"
        def __call__(self, engine, probe=None):
            return [-torch.arange(i.size, dtype=torch.float) for i in engine.info]
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn as nn

from ..backbones import Backbone, backbone_of, eps_fn
from ..core.diffusion import DiffusionLoss, Schedule
from ..core.masks import ChannelMask, select_pruned
from ..errors import CheckpointError

Plan = list[tuple[str, list[int]]]  # (root module name, pruned output-channel indices), in group order


def _tp():
    import torch_pruning as tp

    return tp


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
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=backbone_of(model).trace_inputs(model),
                                                            verbose=False)
    finally:
        model.train(was_training)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    release_autograd(graph)
    return graph


def release_autograd(graph) -> None:
    """Replace the autograd nodes that torch-pruning keeps on its graph by inert snapshots of what it
    reads from them later (`name()` and the `_saved_*` sizes/dims its index mapping consults).

    Grouping and pruning only need the module graph; the live nodes would keep the parameters'
    AccumulateGrad nodes alive, created on the default stream, and a later CUDA-graph capture of the
    training step on a side stream then fails (cudaErrorStreamCaptureImplicit: an Early-Bird run with
    the whole-step graph on the H200, 2026-11-26, whose engine traced the online model)."""
    for node in graph.module2node.values():
        node.grad_fn = _FrozenGradFn.of(node.grad_fn)
        if hasattr(node.module, "grad_fn"):  # torch-pruning's _SliceOp keeps its slicing node
            node.module.grad_fn = _FrozenGradFn.of(node.module.grad_fn)


class _FrozenGradFn:
    """The plain (non-tensor) attributes of an autograd node, without the node."""

    def __init__(self, name: str, saved: dict):
        self._name = name
        self.__dict__.update(saved)

    def name(self) -> str:
        return self._name

    @classmethod
    def of(cls, fn):
        if fn is None or isinstance(fn, cls):
            return fn
        saved = {}
        for attr in dir(fn):
            if attr.startswith("_saved_"):
                try:
                    v = getattr(fn, attr)
                except RuntimeError:  # a saved tensor already freed
                    continue
                if not isinstance(v, torch.Tensor) and not (isinstance(v, (tuple, list)) and
                                                            any(isinstance(x, torch.Tensor) for x in v)):
                    saved[attr] = v
        return cls(fn.name(), saved)


@dataclass(frozen=True)
class GroupInfo:
    name: str  # root module
    size: int  # channels
    gn_groups: int  # GroupNorm groups coupled to the channels (1 = none); attention heads for q/k/v groups
    kind: str = "plain"  # plain | norm (GroupNorm-coupled) | heads (attention q/k/v) | geglu (channel pairs)

    def select(self, scores: torch.Tensor, ratio: float, multiple: int = 1) -> torch.Tensor:
        """The channels this group loses at `ratio` (the ratio rule of `masks.select_pruned`, per kind):
        norm and head groups lose the same number inside each norm group / head (so GroupNorm stays valid
        and no channel changes head); a GEGLU projection's 2H outputs are H pairs (i, i + H), the value and
        the gate of one hidden unit, scored by their sum and pruned together. multiple: the survivors (per
        norm group / head; pairs for GEGLU) are rounded to a multiple of it (`early_bird.round_channels`)."""
        if self.kind == "geglu":
            h = self.size // 2
            pairs = select_pruned(scores[:h] + scores[h:], ratio, 1, multiple)
            return torch.cat([pairs, pairs + h])
        return select_pruned(scores, ratio, self.gn_groups, multiple)


def group_kind(graph, group, names: dict, modules: dict, backbone: Backbone | None = None) -> tuple[str, int]:
    """(kind, rule groups) of a torch-pruning group: see `GroupInfo`. The backbone recognises its own kinds
    (attention heads, GEGLU pairs: `Backbone.group_kind`); the rest is plain or GroupNorm-coupled."""
    own = backbone.group_kind(graph, group, names, modules) if backbone is not None else None
    if own is not None:
        return own
    gns = {d.target.module.num_groups for d, _ in group if isinstance(d.target.module, nn.GroupNorm)}
    return ("norm", max(gns)) if gns else ("plain", 1)


class PruningEngine:
    """Traces `model` once; scores and masks its groups on demand, on the model's device.

    Groups are cut by the ratio rule of their kind (`GroupInfo.select`): plain, GroupNorm-coupled, attention
    q/k/v (every head loses alike; the softmax scale stays the dense one through `FixedScaleAttnProcessor`,
    so removing a channel is zeroing it) and GEGLU pairs. Nothing produces a cross-attention context inside
    the UNet, so no group holds the context width or a class-embedding table (`ClassConditionalUNet`)."""

    def __init__(self, model: nn.Module, ignored: tuple[str, ...] | None = None):
        """ignored: names of modules never pruned (None: the backbone's `ignored_layers`, e.g. conv_out)."""
        self.model = model
        self.graph = build_graph(model)
        backbone = backbone_of(model)
        names = {m: n for n, m in model.named_modules()}
        mods = dict(model.named_modules())
        skip = backbone.ignored_layers(model) if ignored is None else [mods[n] for n in ignored if n in mods]
        groups = self.graph.get_all_groups(ignored_layers=skip, root_module_types=[nn.Conv2d, nn.Linear])
        # canonical order (by root module name): masks of two engines over the same preset compare
        self.groups = sorted(groups, key=lambda g: names[g[0].dep.target.module])
        if not self.groups:
            raise RuntimeError("torch-pruning found no prunable group in the model")
        info = []
        for g in self.groups:
            root = g[0].dep.target.module
            kind, rule = group_kind(self.graph, g, names, mods, backbone)
            size = self.graph.get_out_channels(root)
            info.append(GroupInfo(names[root], int(size), rule, kind))
        self.info = info
        self.sizes = tuple(i.size for i in info)

    # ------------------------------------------------------------------ scores
    def scores(self, criterion: "str | Criterion", probe: "ScoreProbe | None" = None, seed: int = 0) -> list[torch.Tensor]:
        """One score per channel of every group (higher = keep). A gradient criterion without a probe
        reads the gradients already in `.grad`."""
        crit = make_criterion(criterion, seed=seed) if isinstance(criterion, str) else criterion
        return [s.float() for s in crit(self, probe)]

    def group_scores(self, importance) -> list[torch.Tensor]:
        """torch-pruning's `importance(group)` for every group (zeros where it has nothing, e.g. no grads)."""
        out = []
        with torch.no_grad():
            for grp, i in zip(self.groups, self.info):
                s = importance(grp)
                if s is None or s.numel() != i.size:
                    s = torch.zeros(i.size, device=next(self.model.parameters()).device)
                out.append(s.float())
        return out

    def mask_from_scores(self, scores: list[torch.Tensor], ratio: float, multiple: int = 1) -> ChannelMask:
        """multiple: round every group's surviving channels to a multiple of it (`masks.channels_to_prune`;
        `early_bird.round_channels`); 1 = the reference's ticket sizes."""
        pruned = [i.select(s, ratio, multiple) for s, i in zip(scores, self.info)]
        return ChannelMask.from_indices(self.sizes, pruned)

    def mask(self, criterion: "str | Criterion", ratio: float, probe: "ScoreProbe | None" = None,
             seed: int = 0, multiple: int = 1) -> ChannelMask:
        return self.mask_from_scores(self.scores(criterion, probe, seed), ratio, multiple)

    def plan(self, mask: ChannelMask) -> Plan:
        return [(i.name, idx.tolist()) for i, idx in zip(self.info, mask.indices())]


# ---------------------------------------------------------------------- criteria
@dataclass
class ScoreProbe:
    """What a gradient criterion scores on: one fixed batch `x0` (model range), the run's diffusion loss
    (weights, reduction), `timesteps` evenly spaced t inside `t_range`, fixed noise from `seed`."""

    x0: torch.Tensor
    loss: DiffusionLoss
    timesteps: int = 32
    t_range: tuple[int, int] | None = None
    seed: int = 0
    labels: torch.Tensor | None = None  # the batch's classes, for a class-conditional model

    @classmethod
    def of(cls, data, batch: int, loss: DiffusionLoss, timesteps: int, seed: int, device,
           labels: bool = False) -> "ScoreProbe":
        """The first `batch` images of a dataset (`data.ImageData`), scored on the loss's timestep range
        (labels=True: with their classes)."""
        n = min(batch, len(data))
        x0 = data.head(n).to(device)
        y = data.head_labels(n).to(device) if labels else None
        return cls(x0, loss, timesteps, (loss.timesteps.lo, loss.timesteps.hi), seed, y)


class Criterion:
    """Scores every channel of every group of `engine.model` at its current weights (higher = keep).

    `needs_probe`: the criterion scores from the diffusion loss's gradients on a `ScoreProbe` (the
    Early-Bird search then keeps one fixed batch for it). Options every criterion may read: `seed`
    (random), `diff_threshold` (Diff-Pruning)."""

    name: ClassVar[str] = ""
    needs_probe: ClassVar[bool] = False

    def __init__(self, seed: int = 0, diff_threshold: float = 0.05):
        self.seed, self.diff_threshold = seed, diff_threshold

    def __call__(self, engine: PruningEngine, probe: ScoreProbe | None = None) -> list[torch.Tensor]:
        raise NotImplementedError


CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make a criterion available by its `name` (config `early_bird.criterion`,
    `prune.criterion`)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    CRITERIA[cls.name] = cls
    return cls


def criterion_names() -> tuple[str, ...]:
    return tuple(CRITERIA)


def make_criterion(name: str, **options) -> Criterion:
    if name not in CRITERIA:
        raise KeyError(f"unknown pruning criterion '{name}' (known: {', '.join(CRITERIA)})")
    return CRITERIA[name](**options)


@register_criterion
class Magnitude(Criterion):
    """L2 norm of each channel's weights over its whole group (torch-pruning's GroupMagnitudeImportance)."""

    name = "magnitude"

    def __call__(self, engine, probe=None):
        tp = _tp()
        return engine.group_scores(tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean",
                                                                          normalizer=None))


@register_criterion
class Taylor(Criterion):
    """First-order Taylor |w dL/dw| with dL/dw accumulated over the probe's timesteps (one batch,
    fixed noise, one t for the whole batch). Without a probe: the gradients already in `.grad`."""

    name = "taylor"
    needs_probe = True
    threshold: float | None = None  # Diff-Pruning: stop accumulating once L_t < threshold * max L

    def __call__(self, engine, probe=None):
        tp = _tp()
        if probe is None:
            return engine.group_scores(tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None))
        model = engine.model
        flags = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(True)  # a frozen copy (the EMA) is scored too
        try:
            accumulate_taylor_grads(model, probe.loss, probe.x0, probe.timesteps, self.threshold, seed=probe.seed,
                                    t_range=probe.t_range, labels=probe.labels)
            return engine.group_scores(tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None))
        finally:
            model.zero_grad(set_to_none=True)
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)


@register_criterion
class DiffPruning(Taylor):
    """Diff-Pruning: Taylor, accumulated only over the informative timesteps (L_t >= thr * max L)."""

    name = "diff-pruning"

    def __init__(self, seed: int = 0, diff_threshold: float = 0.05):
        super().__init__(seed, diff_threshold)
        self.threshold = diff_threshold


@register_criterion
class Random(Criterion):
    name = "random"

    def __call__(self, engine, probe=None):
        g = torch.Generator().manual_seed(self.seed)
        return [torch.rand(i.size, generator=g) for i in engine.info]


class SizeOnly(Criterion):
    """Every channel scores the same (not a config choice): a ticket's size without reading the weights,
    which the ratio rule alone fixes (a model on the meta device: `ebdiff info`)."""

    name = "size-only"

    def __call__(self, engine, probe=None):
        return [torch.zeros(i.size) for i in engine.info]


def accumulate_taylor_grads(model: nn.Module, loss: "DiffusionLoss | Schedule", x0: torch.Tensor, n_timesteps: int,
                            diff_threshold: float | None = None, seed: int = 0,
                            t_range: tuple[int, int] | None = None, labels: torch.Tensor | None = None) -> dict:
    """Accumulate dL_t/dw into `.grad` over evenly spaced t (one batch, fixed noise, same t per batch).

    L_t is the run's diffusion loss (its weights and reduction; a bare Schedule means the plain mean
    squared error). With `diff_threshold` (Diff-Pruning) the accumulation stops at the first t, in
    ascending order, whose loss falls below threshold * the largest loss seen. The model is put in
    eval mode while scoring (no dropout), so an unchanged model always gives the same scores. labels: the
    batch's classes (a class-conditional model).
    """
    if isinstance(loss, Schedule):
        loss = DiffusionLoss(loss, device=x0.device)
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    g = torch.Generator(device=x0.device).manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, device=x0.device)
    lo, hi = t_range or (0, loss.schedule.T - 1)
    ts = sorted(set(torch.linspace(lo, hi, min(n_timesteps, hi - lo + 1)).round().long().tolist()))
    used, lmax = 0, 0.0
    f = eps_fn(model)
    for t in ts:
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        lt = loss(f, x0, noise, tt, labels)
        lv = float(lt.detach())
        lmax = max(lmax, lv)
        if diff_threshold is not None and lv < diff_threshold * lmax:
            break
        lt.backward()
        used += 1
    model.train(was_training)
    return {"timesteps_used": used, "timesteps_planned": len(ts)}


# ---------------------------------------------------------------------- extraction and replay
def check_plan(plan) -> Plan:
    """A plan read from a file, checked without any model: a list of [module name, channel indices] with
    the indices non-negative integers, sorted and unique; CheckpointError names the first bad entry."""
    if not isinstance(plan, (list, tuple)):
        raise CheckpointError(f"pruning plan: expected a list of [module, channels], got {type(plan).__name__}")
    out: Plan = []
    for k, entry in enumerate(plan):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], (list, tuple))):
            raise CheckpointError(f"pruning plan entry {k}: expected [module name, [channel, ...]], got {entry!r:.80}")
        name, idxs = entry
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idxs):
            raise CheckpointError(f"pruning plan entry {k} ({name}): channels must be non-negative integers")
        if any(a >= b for a, b in zip(idxs, idxs[1:])):
            raise CheckpointError(f"pruning plan entry {k} ({name}): channels must be sorted and unique")
        out.append((name, list(idxs)))
    return out


def check_plan_on(model: nn.Module, plan: Plan) -> None:
    """Every entry of a plan names a module of `model` with an output-channel count, and prunes some but not
    all of its channels, in range: CheckpointError otherwise."""
    mods = dict(model.named_modules())
    for k, (name, idxs) in enumerate(plan):
        weight = getattr(mods.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise CheckpointError(f"pruning plan entry {k}: the model has no prunable module '{name}'")
        if idxs and (idxs[-1] >= weight.shape[0] or len(idxs) >= weight.shape[0]):
            raise CheckpointError(f"pruning plan entry {k} ({name}): channels {idxs[0]}..{idxs[-1]} ({len(idxs)}) "
                                  f"do not fit its {weight.shape[0]} (some must stay)")


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Prune `model` in place by a plan (group order matters: each group's indices are its own); each group
    is checked against the model (`check_plan_on`) before it is pruned."""
    check_plan_on(model, plan)  # every name and range against the unpruned widths, before any pruning
    graph = build_graph(model)
    mods = dict(model.named_modules())
    for name, idxs in plan:
        if not idxs:
            continue
        check_plan_on(model, [(name, idxs)])  # against the widths the groups before it left
        module = mods[name]
        fn = graph.get_pruner_of_module(module).prune_out_channels
        graph.get_pruning_group(module, fn, idxs).prune()
    backbone_of(model).after_pruning(model)  # attributes that keep the dense widths
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


def kept_entries(model: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """Which entries of `model`'s floating-point state survive `plan`: for every floating state_dict entry, the
    flat indices into the dense entry of the pruned one's entries (int64, in the pruned shape), so that
    `dense.reshape(-1)[idx]` is that state (weights, optimizer moments, EMA) restricted to the kept channels.
    Found by pruning copies whose entries hold their own flat indices: float32 holds integers exactly below
    2**24, so a tensor larger than that takes a second copy for the high digits."""
    base = 2 ** 24
    sd = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    digits = 2 if max(v.numel() for v in sd.values()) > base else 1
    kept = {k: torch.zeros((), dtype=torch.long) for k in sd}
    for d in range(digits):
        tagged = copy.deepcopy(model).float()
        with torch.no_grad():
            for k, v in tagged.state_dict().items():
                if k in sd:
                    flat = torch.arange(v.numel(), device=v.device) // base ** d % base
                    v.copy_(flat.view(v.shape).float())
        small = apply_plan(tagged, plan).state_dict()
        for k in sd:
            kept[k] = kept[k] + small[k].long().cpu() * base ** d
    return kept


@dataclass
class Pruned:
    """What pruning a model gives: the physically smaller model, the plan that rebuilds its architecture
    from the dense one (checkpoints replay it), and the channel mask it came from."""

    model: nn.Module
    plan: Plan
    mask: ChannelMask


def cut(model: nn.Module, engine: PruningEngine, mask: ChannelMask, reinit: bool = False,
        init_fn: Callable[[], nn.Module] | None = None) -> Pruned:
    """Extract `mask` from `model`. `engine` traced `model` or a model of the same architecture (its EMA:
    a plan names layers and channels, so it applies to either)."""
    plan = engine.plan(mask)
    return Pruned(extract(model, plan, reinit=reinit, init_fn=init_fn), plan, mask)


def prune(model: nn.Module, criterion: "str | Criterion", ratio: float, probe: "ScoreProbe | None" = None,
          multiple: int = 1, reinit: bool = False, init_fn: Callable[[], nn.Module] | None = None,
          engine: PruningEngine | None = None) -> Pruned:
    """score -> mask -> plan -> extract: the ticket `criterion` cuts from `model` at `ratio` (its current
    weights, surviving channels rounded to `multiple`; `probe` for criteria that score gradients;
    reinit=True keeps the structure only, with init_fn's fresh weights). `engine`: `model`'s traced
    engine, to reuse across ratios."""
    engine = engine or PruningEngine(model)
    return cut(model, engine, engine.mask(criterion, ratio, probe, multiple=multiple), reinit, init_fn)


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
                elif isinstance(mod, nn.Embedding):  # a class embedding added to the timestep embedding
                    w[:, ids] = 0
