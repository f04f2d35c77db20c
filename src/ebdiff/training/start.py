"""How a run starts, decided once: its data, its first model, its facts and its training mode's hooks.

`start_run` picks one way to the first model: `fresh` (the dense preset), `resumed` (the run folder's
newest checkpoint, whose identity must match the config) or `pruned_from_run` (a finished dense run
pruned once: the dense-then-prune baselines, `baselines.prune_from_run`), and adds the Early-Bird
search (`search.EarlyBirdHook`) when the run searches and holds no ticket yet. The loop
(`trainer.Trainer`) trains what it gets and never asks what kind of run it is: it builds the training
state from `RunStart.model`, then `RunStart.prepare(state)` finishes the start on it (a resume's
checkpoint restored, the pruning's time counted, config.yaml recorded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..backbones import ModelSpec, size_of
from ..config import Config, RunSpec, dump_yaml, identity_changes, run_identity
from ..data.datasets import ImageData, iterations_per_epoch, load_training_data
from ..errors import ConfigError, DataError
from ..pruning.engine import ScoreProbe
from ..runs import checkpoint as ck
from ..runs.facts import RunFacts
from ..runs.interop import load_pretrained
from .baselines import prune_from_run
from .hooks import Hook
from .search import EarlyBirdHook, EarlyBirdSearch
from .step import apply_hparams, lr_factor


@dataclass
class First:
    """A start strategy's answer: the first model to train and what comes with it."""

    model: nn.Module
    phase: str = "dense"  # dense | ticket | pruned
    plan: list | None = None
    iteration: int = 0  # where training continues from (a resume's checkpoint)
    facts: RunFacts = field(default_factory=RunFacts)  # ticket, dense size, pruned_from carried in
    prepare: Callable[[ck.TrainState], None] = lambda state: None


@dataclass
class RunStart:
    """What `start_run` decided for the loop."""

    data: ImageData
    model: nn.Module
    phase: str
    plan: list | None
    facts: RunFacts
    arch: dict  # what rebuilds the model from a checkpoint (with its plan) and decodes its samples
    classes: int | None  # the number of classes of a class-conditional run, else None
    hooks: list[Hook]  # the training mode's (the Early-Bird search), before the assembled observers
    search: EarlyBirdSearch | None
    prepare: Callable[[ck.TrainState], None]  # once the state is built from `model`


def fresh(cfg: Config, run_dir: Path, probe, say, spec: ModelSpec) -> First:
    """The dense model, freshly initialised or, with model.pretrained, with the weights of that folder."""
    model = spec.build()
    if cfg.model.pretrained is not None:
        load_pretrained(model, cfg.model.pretrained, "model.pretrained")
        say(f"model.pretrained: the dense weights start from {cfg.model.pretrained}")
    return First(model)


def resumed(cfg: Config, run_dir: Path, probe, say, spec: ModelSpec) -> First:
    ckpt, model, meta, saved = ck.read_for_resume(run_dir, log=say)
    changes = identity_changes(meta.get("identity") or {"model.preset": meta["preset"]}, run_identity(cfg))
    if changes:
        raise ConfigError(f"--resume {run_dir}: {'; '.join(changes)}: these settings define the model "
                          f"or data of its checkpoint {ckpt.name} and cannot change; start a new run instead")
    tc = cfg.train
    lr_at = lr_factor(tc.lr_schedule, tc.lr_warmup, tc.iters)

    def restore(st: ck.TrainState) -> None:
        st.restore(ckpt, saved)
        for change in apply_hparams(st.optimizer, tc, tc.lr * lr_at(st.iteration)):
            say(f"resume: {change}")

    return First(model, meta.get("phase", "dense"), meta.get("plan"), int(meta["iteration"]),
                 RunFacts.carried(meta), restore)


def pruned_from_run(cfg: Config, run_dir: Path, probe, say, spec: ModelSpec) -> First:
    t0 = time.perf_counter()
    pruned, source = prune_from_run(cfg, spec, probe.device, probe, say)
    extract_s = time.perf_counter() - t0

    def count(st: ck.TrainState) -> None:
        st.timing.extract_s += extract_s

    return First(pruned.model, "pruned", pruned.plan, facts=RunFacts(pruned_from=source), prepare=count)


@dataclass
class _Probe:
    """The fixed batch gradient criteria score on (so that masks differ only through the weights)."""

    data: ImageData
    loss: object
    seed: int
    device: torch.device
    labels: bool

    def __call__(self, timesteps: int, batch: int) -> ScoreProbe:
        return ScoreProbe.of(self.data, batch, self.loss, timesteps, self.seed, self.device, labels=self.labels)


def _load_data(cfg: Config, dist) -> tuple[ImageData, ModelSpec]:
    """The training data and the dense model fitted to it (`ModelSpec.fit`: a preset adapted to the data's
    channels and size, a model.config checked against them)."""
    data = load_training_data(cfg.data, cfg.model, dist.device, dist.rank == 0 and cfg.train.progress)
    if len(data) < cfg.train.batch_size:
        raise DataError(f"dataset of {len(data)} images is smaller than one batch (train.batch_size="
                        f"{cfg.train.batch_size})")
    spec = ModelSpec.of(cfg.model).fit(data.shape, f"data.name={cfg.data.name}")
    return data, spec


def start_run(cfg: Config, run_dir: Path, resume: bool, dist, loss, say=print,
              search_artifacts: Callable | None = None) -> RunStart:
    """Decide how the run in `run_dir` starts (`dist`: the process's place, `loss`: the training loss the
    score probe uses). search_artifacts(run_dir, search, ticket_dict, title=...): what writes the
    Early-Bird search's files (None: none)."""
    run_dir, main = Path(run_dir), dist.rank == 0
    data, model_spec = _load_data(cfg, dist)
    torch.manual_seed(cfg.train.seed + dist.rank)
    np.random.seed((cfg.train.seed + dist.rank) % 2**32)
    classes = model_spec.num_classes  # None: unconditional
    probe = _Probe(data, loss, cfg.train.seed, dist.device, classes is not None)
    spec = RunSpec.of(cfg)
    strategy = resumed if resume else pruned_from_run if spec.kind == "prune-from-run" else fresh
    if classes is not None:  # before any model is built or loaded
        data.check_labels(classes, model_spec.classes_setting)
    first = strategy(cfg, run_dir, probe, say, model_spec)
    if main:  # records past the state training continues from (a resume's checkpoint, or 0: a run
        # restarted after dying before its first checkpoint) are trained and logged again: no duplicates
        ck.truncate_log(run_dir / ck.METRICS_FILE, first.iteration)
    facts = first.facts
    facts.image_shape, facts.latent, facts.identity = list(data.shape), data.latent, run_identity(cfg)
    if not facts.dense_size:
        facts.dense_size = size_of(first.model if first.plan is None else model_spec.build())
    hooks, search = [], None
    if spec.searches and first.phase == "dense" and not facts.ticket:
        eb = cfg.early_bird
        ipe = iterations_per_epoch(len(data), cfg.train.batch_size // dist.world, dist.world)
        search = EarlyBirdSearch.from_config(eb, ipe if eb.check_every == "epoch" else int(eb.check_every),
                                             seed=cfg.train.seed,
                                             probe=lambda: probe(eb.taylor_timesteps, eb.taylor_batch))
        hooks.append(EarlyBirdHook(search, eb, model_spec.build, search_artifacts))

    def prepare(st: ck.TrainState) -> None:
        first.prepare(st)
        if main:
            ck.atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))

    arch = {**model_spec.record(), "latent": data.latent}
    return RunStart(data, first.model, first.phase, first.plan, facts, arch, classes, hooks, search, prepare)
