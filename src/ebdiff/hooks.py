"""How a training mode plugs into the loop (`trainer.Trainer`): a Hook overrides what it needs.

The Early-Bird search (`search.EarlyBirdHook`) is one; a study passes plain functions f(trainer)
(`CallbackHook`). A hook reads and changes the trainer's `state` (`checkpoint.TrainState`), logs with
`trainer.log(record)` and prints with `trainer.print(msg)`; `trainer.adopt(model, phase, plan)` swaps
the model being trained (new optimizer, EMA and compiled step).
"""

from __future__ import annotations


class Hook:
    def on_start(self, trainer) -> None:
        """Before the first iteration of this call (also after a resume)."""

    def after_step(self, trainer) -> None:
        """After every iteration (the step is done, `trainer.state.iteration` counts it)."""

    def on_end(self, trainer) -> None:
        """After the last iteration, before the summary is written."""


class CallbackHook(Hook):
    """A plain function f(trainer) called after every iteration (studies, custom logging)."""

    def __init__(self, fn):
        self.fn = fn

    def after_step(self, trainer) -> None:
        self.fn(trainer)
