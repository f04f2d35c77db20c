"""Dense-then-prune baselines (the paper's Table 4 rows besides EB): prune a finished dense run once,
then train the pruned model. prune.reinit=false is train-prune-finetune; true is "Scratch" (the
structure only, re-initialised). Their training time includes the dense run they were cut from.
A diffusers model folder as the source is Diff-Pruning's setting: a pretrained model pruned, then
fine-tuned (its training time is not known here, so none is added)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..backbones import ModelSpec, count_macs_params, format_count
from ..config import Config, is_diffusers_source
from ..errors import CheckpointError, ConfigError
from ..pruning.engine import Pruned, make_criterion, prune
from ..runs import checkpoint as ck
from ..runs.facts import PrunedFrom
from ..runs.interop import load_pretrained


def prune_from_run(cfg: Config, spec: ModelSpec, device: torch.device, probe_fn,
                   say=print) -> tuple[Pruned, PrunedFrom]:
    """(the pruned model with its plan and mask, `pruned_from` facts) from `cfg.prune.from_run`: a finished dense
    run (its newest checkpoint), one of its checkpoint folders (the dense model at that iteration), or a
    diffusers model folder (the Diff-Pruning setting: a pretrained model pruned, then fine-tuned).

    spec: this run's dense model, fitted to its data. probe_fn(timesteps, batch) -> ScoreProbe: the fixed batch
    for gradient criteria."""
    pc, eb = cfg.prune, cfg.early_bird
    src = Path(pc.from_run)
    if is_diffusers_source(pc.from_run):
        dense = load_pretrained(spec.build(), src, "prune.from_run")
        facts = dict(run=str(src), checkpoint="diffusers", iteration=0, train_s=None, weights="pretrained")
    else:
        dense, facts = _dense_of_run(src, spec, pc.weights, say)
    dense = dense.to(device).train()
    crit = make_criterion(pc.criterion, seed=cfg.train.seed, diff_threshold=eb.diff_threshold)
    probe = probe_fn(eb.taylor_timesteps, eb.taylor_batch) if crit.needs_probe else None
    pruned = prune(dense, crit, pc.ratio, probe, multiple=eb.round_channels, reinit=pc.reinit, init_fn=spec.build)
    pruned.model.train()
    facts = PrunedFrom(**facts, criterion=pc.criterion, ratio=pc.ratio, reinit=pc.reinit,
                       method="scratch" if pc.reinit else "prune-finetune",
                       pruned_channel_fraction=pruned.mask.pruned_fraction, round_channels=eb.round_channels)
    macs, params = count_macs_params(pruned.model)
    what = "Scratch (structure only, re-initialised)" if pc.reinit else f"prune+finetune ({pc.criterion})"
    at = "its pretrained weights" if facts.checkpoint == "diffusers" else f"iteration {facts.iteration}"
    say(f"{what}: pruned {src} at {at} to {format_count(params)} params, {format_count(macs)} MACs")
    return pruned, facts


def _dense_of_run(src: Path, spec: ModelSpec, weights: str, say) -> tuple[torch.nn.Module, dict]:
    """The dense model of a finished ebdiff run or of one of its checkpoint folders (its `weights`: ema or
    online), checked to be this run's model, and the `PrunedFrom` facts of where it came from."""
    named = (src / "meta.json").is_file()  # a checkpoint folder: prune the dense model at that iteration
    ckpt = src if named else ck.latest_checkpoint(src)
    if ckpt is None:
        raise CheckpointError(f"prune.from_run={src}: no checkpoint there (train the dense model first, or give a "
                              "diffusers model folder)")
    run = ck.run_folder(ckpt)
    meta = ck.read_meta(ckpt)
    if meta.get("plan"):
        raise ConfigError(f"prune.from_run={src} holds a pruned model ({meta.get('phase')}); it must be a dense run")
    theirs = ModelSpec.from_meta(meta)
    if (theirs.preset, theirs.backbone.name, theirs.model_config) != (spec.preset, spec.backbone.name,
                                                                      spec.model_config):
        raise ConfigError(f"prune.from_run={src} is a {theirs.label} run; this run has {spec.label}"
                          + (" (another architecture)" if theirs.label == spec.label else ""))
    if meta.get("num_classes") != spec.num_classes:
        raise ConfigError(f"prune.from_run={src} has model.num_classes={meta.get('num_classes')}; this run has "
                          f"model.num_classes={spec.num_classes}")
    summary = ck.read_json(run / "summary.json")
    if summary is None or summary.get("iterations") != meta["iteration"]:
        summary = None  # no summary of this iteration: the time is the checkpoint's
        if not named:
            say(f"warning: {src} has no finished summary for its latest checkpoint (iteration {meta['iteration']}); "
                "its time is taken from the checkpoint")
    src_time = (summary or {}).get("time_s", {}).get("train_total")
    if src_time is None:
        src_time = ck.load_state(ckpt).get("timing", {}).get("dense_s")
    dense = ck.build_from_meta(meta)
    ck.load_weights(dense, ckpt / ("ema.safetensors" if weights == "ema" else "model.safetensors"))
    return dense, dict(run=str(src), checkpoint=ckpt.name, iteration=int(meta["iteration"]), train_s=src_time,
                       weights=weights)
