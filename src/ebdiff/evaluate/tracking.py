"""Experiment trackers (TensorBoard, Weights & Biases) through accelerate's tracker classes, and sample
grids during training. `metrics.jsonl` stays the source of truth: every record the loop logs there
is mirrored to the tracker (its numbers), nothing else is.

W&B without a network: `WANDB_MODE=offline` (the default ebdiff sets when no `WANDB_API_KEY` is
configured) writes the run under `RUN/wandb/` for a later `wandb sync`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..backbones import eps_fn, model_classes
from ..core.diffusion import Schedule
from ..core.sampling import class_rows, generate, to_uint8
from ..data.latents import LatentDecoder
from ..errors import ConfigError
from ..training.hooks import Hook
from .report import save_grid

TRACKERS = ("none", "tensorboard", "wandb")


class Tracker:
    """One run's tracker; `log(record, step)` takes a metrics.jsonl record and sends its numbers
    (events become `event/key`, e.g. `ticket/iteration`, `eb_check/max_distance`)."""

    def __init__(self, kind: str, run_dir: Path, config: dict):
        from accelerate import tracking

        run_dir = Path(run_dir)
        try:
            if kind == "tensorboard":
                t = tracking.TensorBoardTracker(run_name="tensorboard", logging_dir=str(run_dir))
            elif kind == "wandb":
                if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
                    os.environ["WANDB_MODE"] = "offline"
                t = tracking.WandBTracker(run_name="ebdiff", name=run_dir.name, dir=str(run_dir))
            else:
                raise ConfigError(f"train.log_with={kind} is not one of {', '.join(TRACKERS)}")
            t.main_process_only = False  # ebdiff only makes trackers on the rank that writes the run folder
            t.start()
        except ModuleNotFoundError as exc:
            raise ConfigError(f"train.log_with={kind} needs the '{exc.name}' package: pip install "
                              f"{'tensorboard' if kind == 'tensorboard' else 'wandb'}") from None
        self.kind, self.t = kind, t
        flat = {f"{s}.{k}": v for s, sec in config.items() if isinstance(sec, dict) for k, v in sec.items()}
        self.t.store_init_configuration({k: v if isinstance(v, (bool, int, float, str)) else str(v)
                                         for k, v in flat.items()})

    def log(self, record: dict, step: int) -> None:
        prefix = f"{record['event']}/" if "event" in record else ""
        values = {prefix + k: float(v) for k, v in record.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("iter", "event")}
        if values:
            self.t.log(values, step=step)

    def log_images(self, name: str, images_u8: np.ndarray, step: int) -> None:
        """images_u8: NHWC uint8."""
        if self.kind == "tensorboard":
            self.t.log_images({name: images_u8}, step=step, dataformats="NHWC")
        else:
            self.t.log_images({name: list(images_u8)}, step=step)

    def close(self) -> None:
        self.t.finish()


class SampleGridHook(Hook):
    """Every `every` iterations: sample the EMA model (the run's sampler, fixed noise), save
    RUN/samples/iter-NNNNNNNNN.png and send the grid to the tracker. Its time is not training time: it runs
    inside the loop's `paused()` (counted in timing.eval_s, not in the wall clock or images/s)."""

    def __init__(self, cfg, every: int, n: int = 16):
        self.sample, self.diffusion, self.preset = cfg.sample, cfg.diffusion, cfg.model.preset
        self.every, self.n = every, n

    def after_step(self, ctx) -> None:
        st = ctx.state
        if st.iteration % self.every or not ctx.main:
            return
        with ctx.paused():  # kept out of the training time, the wall clock and images/s (timing.eval_s)
            self._grid(ctx, st)

    def _grid(self, ctx, st) -> None:
        t0 = time.perf_counter()
        s, d = self.sample, self.diffusion
        classes, latent = model_classes(st.ema.module), st.facts.latent
        labels, row = (None, None) if classes is None else class_rows(classes, self.n, s.classes)
        x = generate(eps_fn(st.ema.module), self.n, tuple(st.facts.image_shape), Schedule.from_config(d),
                     sampler=s.sampler, steps=min(s.steps, d.timesteps), spacing=s.spacing, batch_size=self.n,
                     seed=s.seed, device=ctx.device, eta=s.eta, variance=s.variance, clip_x0=s.clip_x0, labels=labels,
                     guidance=s.guidance, null_class=classes, clamp=latent is None)
        if latent is not None:
            x = LatentDecoder(latent, ctx.device, self.preset)(x)
        imgs = to_uint8(x)
        save_grid(imgs, ctx.run_dir / "samples" / f"iter-{st.iteration:09d}.png", nrow=row)
        if ctx.tracker is not None:
            ctx.tracker.log_images("samples", imgs, st.iteration)
        ctx.log({"event": "samples", "iter": st.iteration, "seconds": time.perf_counter() - t0})
