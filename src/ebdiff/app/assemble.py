"""Where a training run is assembled: the loop (`trainer.Trainer`) with the hooks that are not training.

The training layer (trainer, start, search, baselines, step) never imports evaluation, reports or
trackers; this module hands them in: evaluation during training (`training_eval.EvalHook`, when
train.eval_every is set), sample grids (`tracking.SampleGridHook`, train.sample_every), the tracker
the log is mirrored to (`tracking.Tracker`, train.log_with) and the Early-Bird search's files
(`report.write_search_artifacts`: masks, the Hamming-distance plot, ticket.json). `train` is the
public entry (`ebdiff.train`, `ebdiff train`, `ebdiff experiment`, each TA-EB branch).
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config, RunSpec
from ..errors import ConfigError
from ..evaluate.report import write_search_artifacts
from ..evaluate.tracking import SampleGridHook, Tracker
from ..evaluate.training_eval import EvalHook
from ..training.hooks import CallbackHook
from ..training.trainer import Trainer


def make_trainer(cfg: Config, run_dir: str | Path, resume: bool = False, callbacks: list | None = None,
                 group=None) -> Trainer:
    """The loop for one run folder with everything the config asks to observe it. callbacks: functions
    f(context) called after every iteration with the run's `hooks.RunContext` (context.state: the
    training state). group: a torch.distributed process group (a TA-EB region branch)."""
    if RunSpec.of(cfg).kind == "ta-eb":
        raise ConfigError("this config has 'regions' (a TA-EB run): train it with `ebdiff ta-eb`")
    tc = cfg.train
    hooks = [CallbackHook(f) for f in callbacks or []]
    if tc.sample_every:
        hooks.append(SampleGridHook(cfg, tc.sample_every))
    evaluation = [EvalHook(cfg)] if tc.eval_every is not None else []
    tracker = None if tc.log_with == "none" else (lambda: Tracker(tc.log_with, Path(run_dir), cfg.to_dict()))
    return Trainer(cfg, run_dir, resume=resume, group=group, hooks=hooks, evaluation=evaluation, tracker=tracker,
                   search_artifacts=write_search_artifacts)


def train(cfg: Config, run_dir: str | Path, resume: bool = False, callbacks: list | None = None,
          group=None) -> dict:
    """Train (or resume) one run folder; returns its summary (the dict written to summary.json)."""
    return make_trainer(cfg, run_dir, resume, callbacks, group).run()
