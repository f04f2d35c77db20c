"""TA-EB's pure part: the branch specs (the region set of a config, each branch's config and folder) and
the accounting's arithmetic and text. The launcher (`taeb.py`, above the trainer) trains the branches;
evaluation, interop, experiments and the CLI read a TA-EB run through this module and `runs.folders` only.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..config import Config
from ..core.regions import Region, RegionSet
from ..errors import ConfigError


def region_set(cfg: Config) -> RegionSet:
    if not cfg.regions:
        raise ConfigError("ta-eb needs a 'regions' list in the config, e.g. regions: "
                          "[{t: [0, 260], ratio: 0.3}, {t: [240, 460], ratio: 0.6}, {t: [440, 999], ratio: 0.8}]")
    return RegionSet.from_config(cfg.regions, cfg.diffusion.timesteps)


def branch_config(cfg: Config, region: Region) -> Config:
    """The config of one region branch: its timesteps, ratio, eta and iteration budget."""
    c = copy.deepcopy(cfg)
    c.regions = None
    c.diffusion.t_min, c.diffusion.t_max = region.lo, region.hi
    c.early_bird.ratio = region.ratio
    if region.eta is not None:
        c.early_bird.eta = region.eta
    if region.iters is not None:
        c.train.iters = region.iters
    return c


def branch_dir(run: Path, k: int) -> Path:
    return Path(run) / f"region-{k}"


def size_weightings(regions: RegionSet, params: list[float], macs: list[float], visited: list[int],
                    rule: str, sampler: str) -> dict:
    """Pure: TA-EB's params/MACs as one number, in the two ways they are reported, each with its definition:
    `sampling_steps` averages the region models over the timesteps the sampler visits (what sampling
    costs with these settings), `timesteps` over all T timesteps, each served by one region (uniform
    over T; what the paper's Table 4 reports: 7.69M / 1.32G for CIFAR-10's 30/60/80% regions, against
    13.11M / 2.25G by 100 quad-spaced DDIM steps)."""
    every_t = list(range(regions.T))
    return {
        "sampling_steps": {
            "definition": f"mean over the {len(visited)} timesteps the sampler visits ({sampler})",
            "params": regions.weighted(params, visited, rule), "macs": regions.weighted(macs, visited, rule),
            "steps_per_region": regions.steps_per_region(visited, rule)},
        "timesteps": {
            "definition": f"mean over all T={regions.T} timesteps, each served by one region (uniform over T; "
                          "the paper's Table 4)",
            "params": regions.weighted(params, every_t, rule), "macs": regions.weighted(macs, every_t, rule),
            "timesteps_per_region": regions.steps_per_region(every_t, rule)},
    }


SHARED_NOTE = ("the branches trained at the same time on shared devices (more branch processes than devices): "
               "each branch's seconds include the others' load, so the longest branch is not what one device per "
               "branch would take (time them alone with taeb.launch=sequential, or one device each)")


def device_seconds(branches: list[dict], shared: bool = False) -> dict:
    """Pure: TA-EB's training cost counted two ways, each with its speed-up over the dense model trained for
    as many iterations as the longest branch, at the seconds per iteration the branches' dense (search)
    phases measured (`dense_s` over `dense_iterations`, averaged over the branches that have one):
    `one_device_per_branch` is the longest branch (the branches in parallel; what the paper's speed-ups
    count), `one_device` all branches' seconds together (what a single device pays, one after another).
    shared: the branches ran at the same time on shared devices; the longest branch then measured the load of
    the others too, and its speed-up is not given (`shared_device` says why)."""
    rates = [b["dense_s"] / b["dense_iterations"] for b in branches if b.get("dense_iterations") and "dense_s" in b]
    iters = max(b["dense_iterations"] + b["ticket_iterations"] for b in branches)
    dense = sum(rates) / len(rates) * iters if rates else None
    longest, together = max(b["train_s"] for b in branches), sum(b["train_s"] for b in branches)
    speedup = lambda t: dense / t if dense is not None and t > 0 else None  # noqa: E731
    return {
        "dense_estimate": {"train_s": dense, "iterations": iters, "definition": f"the dense model for {iters} "
                           "iterations at the s/iteration of the branches' dense phases"},
        **({"shared_device": SHARED_NOTE} if shared else {}),
        "one_device_per_branch": {"train_s": longest, "speedup_over_dense": None if shared else speedup(longest),
                                  "definition": "the longest branch (branches in parallel; the paper counts this)"},
        "one_device": {"train_s": together, "speedup_over_dense": speedup(together),
                       "definition": "all branches' device-seconds together (one device, one after another)"},
    }


def accounting_record(regions: RegionSet, branches: list[dict], route: str, sc, visited: list[int],
                      shared: bool = False) -> dict:
    """Pure: taeb.json's content from the branches' sizes and times (`taeb.accounting` reads them): the
    weighted sizes in both weightings (`size_weightings`), the longest branch's and all branches' training time
    (and their speed-ups: `device_seconds`). sc: the sample settings (sampler, steps, spacing); visited: the
    timesteps that sampler visits."""
    sampler = f"{sc.sampler}, {sc.steps} steps, {sc.spacing} spacing" if sc.sampler == "ddim" else sc.sampler
    w = size_weightings(regions, [b["params"] for b in branches], [b["macs"] for b in branches], visited, route,
                        sampler)
    return {
        "route": route, "sampler": {"sampler": sc.sampler, "steps": sc.steps, "spacing": sc.spacing},
        "steps_per_region": w["sampling_steps"]["steps_per_region"],
        # weighted_params / weighted_macs: by the sampling steps (weightings.sampling_steps), kept for readers
        "weighted_params": w["sampling_steps"]["params"], "weighted_macs": w["sampling_steps"]["macs"],
        "weightings": w,
        "branches": branches,
        "taeb_train_s": max(b["train_s"] for b in branches),
        "sum_train_s": sum(b["train_s"] for b in branches),
        "device_seconds": device_seconds(branches, shared),
    }


def format_accounting(a: dict) -> str:
    lines = ["region          ratio  ticket at   params      MACs   steps  search s  train s",
             "--------------  -----  ---------  --------  --------  -----  --------  -------"]
    for b, n in zip(a["branches"], a["steps_per_region"]):
        r = b["region"]
        tk = str(b["ticket_iteration"]) if b["ticket_found"] else "none"
        lines.append(f"[{r['t'][0]:>3}, {r['t'][1]:>3}]      {r['ratio']:5.2f}  {tk:>9}  {b['params'] / 1e6:7.2f}M "
                     f"{b['macs'] / 1e9:8.3f}G  {n:5d}  {b['search_s']:8.1f}  {b['train_s']:7.1f}")
    lines.append(f"weighted over the {sum(a['steps_per_region'])} sampling steps ({a['route']} routing): "
                 f"{a['weighted_params'] / 1e6:.2f}M params, {a['weighted_macs'] / 1e9:.3f}G MACs")
    t = (a.get("weightings") or {}).get("timesteps")
    if t:
        lines.append(f"weighted over all {sum(t['timesteps_per_region'])} timesteps ({'/'.join(map(str, t['timesteps_per_region']))} "
                     f"per region, the paper's Table 4): {t['params'] / 1e6:.2f}M params, {t['macs'] / 1e9:.3f}G MACs")
    lines.append(f"TA-EB training time (longest branch): {a['taeb_train_s']:.1f} s "
                 f"(all branches together {a['sum_train_s']:.1f} s)")
    d = a.get("device_seconds") or {}
    if (d.get("dense_estimate") or {}).get("train_s"):
        x = lambda k: f"{d[k]['speedup_over_dense']:.2f}x" if d[k]["speedup_over_dense"] else "-"  # noqa: E731
        lines.append(f"speed-up over dense ({d['dense_estimate']['train_s']:.1f} s estimated for "
                     f"{d['dense_estimate']['iterations']} iterations): {x('one_device_per_branch')} with one device "
                     f"per branch (the paper's count), {x('one_device')} on one device (all branches' seconds)")
    if d.get("shared_device"):
        lines.append(f"note: {d['shared_device']}")
    return "\n".join(lines)
