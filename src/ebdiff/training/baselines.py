"""Dense-then-prune baselines (the paper's Table 4 rows besides EB): prune a finished dense run once,
then train the pruned model. prune.reinit=false is train-prune-finetune; true is "Scratch" (the
structure only, re-initialised). Their training time includes the dense run they were cut from."""

from __future__ import annotations

from pathlib import Path

import torch

from ..backbones import backbone_of_preset, build_from_config, count_macs_params, format_count
from ..config import Config
from ..errors import CheckpointError, ConfigError
from ..pruning.engine import Pruned, make_criterion, prune
from ..runs import checkpoint as ck
from ..runs.facts import PrunedFrom


def prune_from_run(cfg: Config, device: torch.device, probe_fn, say=print) -> tuple[Pruned, PrunedFrom]:
    """(the pruned model with its plan and mask, `pruned_from` facts) from the dense run `cfg.prune.from_run`:
    a run folder (its newest checkpoint) or one of its checkpoint folders (the dense model at that iteration).

    probe_fn(timesteps, batch) -> ScoreProbe: the fixed batch for gradient criteria."""
    pc, mc, eb = cfg.prune, cfg.model, cfg.early_bird
    src = Path(pc.from_run)
    named = (src / "meta.json").is_file()  # a checkpoint folder: prune the dense model at that iteration
    ckpt = src if named else ck.latest_checkpoint(src)
    if ckpt is None:
        raise CheckpointError(f"prune.from_run={src}: no checkpoint there (train the dense model first)")
    run = ck.run_folder(ckpt)
    meta = ck.read_meta(ckpt)
    if meta.get("plan"):
        raise ConfigError(f"prune.from_run={src} holds a pruned model ({meta.get('phase')}); it must be a dense run")
    if meta["preset"] != mc.preset:
        raise ConfigError(f"prune.from_run={src} is a model.preset={meta['preset']} run; this run has "
                          f"model.preset={mc.preset}")
    classes = backbone_of_preset(mc.preset).classes(mc.preset, mc.num_classes)
    if meta.get("num_classes") != classes:
        raise ConfigError(f"prune.from_run={src} has model.num_classes={meta.get('num_classes')}; this run has "
                          f"model.num_classes={classes}")
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
    ck.load_weights(dense, ckpt / ("ema.safetensors" if pc.weights == "ema" else "model.safetensors"))
    dense = dense.to(device).train()
    crit = make_criterion(pc.criterion, seed=cfg.train.seed, diff_threshold=eb.diff_threshold)
    probe = probe_fn(eb.taylor_timesteps, eb.taylor_batch) if crit.needs_probe else None
    pruned = prune(dense, crit, pc.ratio, probe, multiple=eb.round_channels, reinit=pc.reinit,
                   init_fn=lambda: build_from_config(mc))
    pruned.model.train()
    facts = PrunedFrom(run=str(src), checkpoint=ckpt.name, iteration=int(meta["iteration"]), train_s=src_time,
                       criterion=pc.criterion, ratio=pc.ratio, weights=pc.weights, reinit=pc.reinit,
                       method="scratch" if pc.reinit else "prune-finetune",
                       pruned_channel_fraction=pruned.mask.pruned_fraction, round_channels=eb.round_channels)
    macs, params = count_macs_params(pruned.model)
    what = "Scratch (structure only, re-initialised)" if pc.reinit else f"prune+finetune ({pc.criterion})"
    say(f"{what}: pruned {src} at iteration {meta['iteration']} to {format_count(params)} params, "
        f"{format_count(macs)} MACs")
    return pruned, facts
