"""How a training mode or an observer plugs into the loop (`trainer.Trainer`): a Hook overrides what it needs.

A hook sees the run through a `RunContext`, not the trainer: the training state (`checkpoint.TrainState`:
model, EMA, optimizer, iteration, phase, plan, timing, search, facts), `log(record)` (metrics.jsonl and
the tracker), `print(msg)`, `adopt(model, phase, plan)` (train another model from here on: new optimizer,
EMA and compiled step), `paused()` (work that is not training time), `barrier()`, the run folder, whether
this process writes it (`main`), the device, `arch` (what rebuilds the model from a checkpoint), the
training `data`, the tracker and `stopping` (why this iteration is the last, else None). A hook takes
its own settings when it is made. The Early-Bird search (`search.EarlyBirdHook`) is one; evaluation during training
(`training_eval.EvalHook`) and sample grids (`tracking.SampleGridHook`) are others; a study passes plain
functions f(context) (`CallbackHook`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

if TYPE_CHECKING:
    from ..runs.checkpoint import TrainState


@dataclass
class RunContext:
    """What a hook sees of the run (the same object for the whole run; `state` changes inside it)."""

    state: "TrainState"
    run_dir: Path
    main: bool  # this process writes the run folder (rank 0)
    device: Any  # torch.device
    arch: dict  # preset, dropout, num_classes, latent: what rebuilds the model (with state.plan)
    data: Any  # data.ImageData: the training data (a study's fixed batch: data.head(n))
    log: Callable[[dict], None]
    print: Callable[[str], None]
    adopt: Callable[..., None]  # adopt(model, phase, plan, kept=None)
    paused: Callable[[], ContextManager]
    barrier: Callable[[], None]
    tracker: Any = None  # tracking.Tracker on the main process when train.log_with is set
    stopping: str | None = None  # "iters" / "max_seconds" on the last iteration of this call


class Hook:
    def on_start(self, ctx: RunContext) -> None:
        """Before the first iteration of this call (also after a resume)."""

    def after_step(self, ctx: RunContext) -> None:
        """After every iteration (the step is done, `ctx.state.iteration` counts it)."""

    def on_end(self, ctx: RunContext) -> None:
        """After the last iteration, before the summary is written."""


class CallbackHook(Hook):
    """A plain function f(context) called after every iteration with the `RunContext` (studies, custom
    logging): `context.state.iteration`, `context.state.model`, `context.log(record)`..."""

    def __init__(self, fn):
        self.fn = fn

    def after_step(self, ctx: RunContext) -> None:
        self.fn(ctx)
