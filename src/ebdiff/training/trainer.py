"""The training loop: iterations, timing, logging and checkpoint cadence, and hooks.

One `Trainer` runs one run folder. How the run starts (its data, first model, facts and the training
mode's hooks: fresh, resumed, pruned from a finished run, the Early-Bird search) is decided once by
`start.start_run`; what observes training without being training (evaluation, sample grids, the
tracker) is handed in by the layer that assembles a run (`assemble.train`). Everything that is
training state lives in one `checkpoint.TrainState`, saved every `train.ckpt_every` iterations and
restored exactly on resume: every batch, timestep draw and noise draw is a function of the seed and
the iteration. Hooks see the run through a `hooks.RunContext`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..backbones import size_of
from ..config import Config
from ..core.accounting import LossMeter, run_summary
from ..core.diffusion import DiffusionLoss, class_dropout
from ..data.datasets import BatchStream, to_device
from ..errors import ConfigError, Interrupted, NonFiniteError
from ..progress import progress_bar
from ..runs import checkpoint as ck
from .compile_cache import CompileCache
from .distributed import make_dist, stop_requests
from .hooks import Hook, RunContext
from .start import start_run
from .step import (
    EMA,
    TrainStep,
    carry_ema,
    carry_optimizer,
    lr_factor,
    make_optimizer,
    prepare_model,
    resolve_fast_path,
)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False, group=None, hooks=(), evaluation=(),
                 tracker=None, search_artifacts=None):
        """group: a torch.distributed process group (a TA-EB region branch; default: accelerate decides).
        hooks run before the training mode's hooks (callbacks, sample grids), evaluation after them (they
        see the model the mode leaves: a ticket just drawn). tracker(): the tracker the log is mirrored to
        (made on the main process once started). search_artifacts: see `start.start_run`."""
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.before, self.after = list(hooks), list(evaluation)
        self.open_tracker, self.search_artifacts = tracker, search_artifacts
        self.dist = make_dist(cfg.train.device, group)
        self.device, self.rank, self.world = self.dist.device, self.dist.rank, self.dist.world
        self.main = self.rank == 0
        if cfg.train.batch_size % self.world:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by {self.world} processes")
        self.local_batch = cfg.train.batch_size // self.world
        self.loss = DiffusionLoss.from_config(cfg.diffusion, self.device)
        self.lr_at = lr_factor(cfg.train.lr_schedule, cfg.train.lr_warmup, cfg.train.iters)
        self.state: ck.TrainState | None = None
        self.ctx: RunContext | None = None
        self.meter = None
        self.compile_cache = CompileCache.from_setting(cfg.train.compile_cache, self.device)

    def _start(self) -> None:
        s = start_run(self.cfg, self.run_dir, self.resume, self.dist, self.loss, self.print, self.search_artifacts)
        self.data, self.classes, self.arch = s.data, s.classes, s.arch
        self.hooks: list[Hook] = [*self.before, *s.hooks, *self.after]
        self.adopt(s.model.to(self.device), s.phase, s.plan)
        st = self.state
        st.facts, st.search = s.facts, s.search
        s.prepare(st)
        self.ctx = RunContext(st, self.run_dir, self.main, self.device, self.arch, self.data, self.log, self.print,
                              self.adopt, self.paused, self.dist.barrier)

    @contextmanager
    def paused(self):
        """Work inside that is not training (evaluation during training): the device first finishes the
        training work queued so far, which counts as training; the time inside counts as
        `timing.eval_s` and is kept out of the training time, the wall clock and the images/s."""
        st = self.state
        if self.device.type == "cuda":
            t0 = time.perf_counter()
            torch.cuda.synchronize(self.device)
            st.timing.add_step(st.phase, time.perf_counter() - t0)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            st.timing.eval_s += dt
            self._wall0 += dt
            if self.meter is not None:
                self.meter.pause(dt)

    def adopt(self, model: nn.Module, phase: str, plan: list | None, kept: dict | None = None) -> None:
        """Train `model` from here on (dense, ticket, pruned): its fast-path layout, optimizer, EMA and compiled
        step; kept (`pruning.kept_entries`, early_bird.carry_state): the old optimizer state and EMA carry over."""
        tc = self.cfg.train
        self.fast = resolve_fast_path(tc, self.device, self.world)
        prepare_model(model, self.fast)
        opt = make_optimizer(model.parameters(), tc, self.fast)
        self.model_p = self.dist.prepare_model(model)  # DDP when several processes
        ema = EMA.from_config(model, tc)
        if kept is not None:
            carry_optimizer(self.state.optimizer, self.state.model, opt, model, kept)
            carry_ema(self.state.ema, ema, kept)
        if self.state is None:
            self.state = ck.TrainState(model, ema, opt, phase=phase, plan=plan)
        else:
            st = self.state
            st.model, st.ema, st.optimizer, st.phase, st.plan, st.search = model, ema, opt, phase, plan, None
        self.step = TrainStep(self.model_p, model, opt, ema, self.loss, tc.grad_clip, self.fast,
                              skip_nonfinite=tc.nonfinite == "skip", accum=tc.grad_accum,
                              cache=self.compile_cache, planned_iters=lambda: tc.iters - self.state.iteration,
                              on_decision=self._compile_decision)
        self.noise_gen = torch.Generator(device=self.device)

    def _compile_decision(self, d: dict) -> None:
        """train.compile=auto decided for the current model shape: one line, a metrics event, a fact."""
        rec = {"iter": self.state.iteration, "phase": self.state.phase, **d}
        self.print(d["reason"])
        self.log({"event": "compile_decision", **rec})
        self.state.facts.compile_decisions.append(rec)

    def print(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg)

    def log(self, rec: dict) -> None:
        """One record to metrics.jsonl (the source of truth), mirrored to the tracker (train.log_with)."""
        if self.main:
            with open(self.run_dir / ck.METRICS_FILE, "a") as f:
                f.write(ck.json_line(rec))
            if self.ctx is not None and self.ctx.tracker is not None:
                self.ctx.tracker.log(rec, rec.get("iter", self.state.iteration))

    def save(self) -> None:
        bad = ck.nonfinite_tensor(self.state.model, self.state.ema.module)
        if bad is not None:
            self._nonfinite(f"weight '{bad}' is not finite")
        self.dist.barrier()
        if self.main:
            self.state.timing.wall_s = time.perf_counter() - self._wall0
            self.state.save(self.run_dir, self.cfg.train.keep_last, self.arch)

    def _nonfinite(self, what: str) -> None:
        raise nonfinite_error(self.run_dir, self.state.iteration, what)

    def _step(self, x0: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # every random draw of an iteration is a function of (seed, iteration, rank): exact resume
        seed = (self.cfg.train.seed * 1_000_003 + self.state.iteration) * 64 + self.rank
        t = to_device(self.loss.timesteps(x0.shape[0], generator=torch.Generator().manual_seed(seed)), self.device)
        self.noise_gen.manual_seed(seed)
        noise = torch.randn(x0.shape, generator=self.noise_gen, device=self.device)
        extra = () if labels is None else (class_dropout(labels, self.cfg.model.class_dropout, self.classes, seed),)
        return self.step(x0, t, noise, *extra)

    def run(self) -> dict:
        """Train to train.iters under the run folder's lock; SIGINT/SIGTERM/SIGHUP save a checkpoint and stop."""
        created = self.main and not self.run_dir.exists()
        with ck.RunLock(self.run_dir, "train") if self.main else contextlib.nullcontext():
            try:
                self._start()
            except BaseException:
                if created:  # a failed start leaves no half-made run folder
                    shutil.rmtree(self.run_dir, ignore_errors=True)
                raise
            if self.main and self.open_tracker is not None:
                self.ctx.tracker = self.open_tracker()
            try:
                with stop_requests() as stop:
                    return self._loop(stop)
            finally:
                if self.ctx.tracker is not None:
                    self.ctx.tracker.close()

    def _loop(self, stop: list[int]) -> dict:
        tc, st, ctx = self.cfg.train, self.state, self.ctx
        done = st.timing.budget_reached(st.iteration, tc.iters, tc.max_seconds)
        if done:  # a crash between the last checkpoint and the summary left none
            self.print(f"{self.run_dir}: already trained to {st.iteration} iterations" + (
                f" ({st.timing.own_total:.0f} s of training, train.max_seconds={tc.max_seconds:g})" * (done == "max_seconds")))
            return self._finish(done)
        batches = BatchStream(self.data, self.local_batch, tc.seed, self.device, self.rank, self.world,
                              self.cfg.data.num_workers, labels=self.classes is not None)(st.iteration)
        self.model_p.train()
        bar = progress_bar(total=tc.iters, initial=st.iteration, disable=not (self.main and tc.progress),
                           desc=st.phase, dynamic_ncols=True)
        self._wall0, ctx.stopping = time.perf_counter() - st.timing.wall_s, None
        self.meter = LossMeter(self.device, st.iteration)
        for h in self.hooks:
            h.on_start(ctx)
        while ctx.stopping is None:
            t_step = time.perf_counter()
            if tc.lr_schedule != "constant" or tc.lr_warmup:
                for g in st.optimizer.param_groups:
                    g["lr"] = tc.lr * self.lr_at(st.iteration)
            batch = next(batches)
            loss = self._step(*batch) if isinstance(batch, tuple) else self._step(batch)
            self.meter.add(loss)  # None: train.nonfinite=skip dropped this step
            st.iteration += 1
            if self.device.type == "cuda" and st.iteration % tc.log_every == 0:
                torch.cuda.synchronize()
            st.timing.add_step(st.phase, time.perf_counter() - t_step)
            bar.update(1)
            # the last iteration of this call: the hooks see it (a final evaluation point), then it is saved
            ctx.stopping = stop_reason(st, tc, self.world, self.dist.mean, self.device)
            if st.iteration % tc.log_every == 0 or ctx.stopping:
                rec = self.meter.interval(st.iteration, tc.batch_size, self.dist.mean)
                if not math.isfinite(rec.get("loss", 0.0)):
                    self._nonfinite(f"the training loss is {rec['loss']} (not finite)")
                if "skipped_steps" in rec:  # train.nonfinite=skip dropped steps in this interval
                    st.facts.skipped_steps = (st.facts.skipped_steps or 0) + rec["skipped_steps"]
                self.log({"iter": st.iteration, **rec, "wall_s": time.perf_counter() - self._wall0,
                          "lr": st.optimizer.param_groups[0]["lr"], "phase": st.phase})
                bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4f}", img_s=f"{rec['images_per_s']:.0f}")
            for h in self.hooks:
                h.after_step(ctx)
            bar.set_description(st.phase)
            if st.iteration % tc.ckpt_every == 0 or ctx.stopping or stop:
                self.save()
            if stop:
                bar.close()
                raise interrupted(stop[0], st.iteration, self.run_dir)
        bar.close()
        if ctx.stopping == "max_seconds":
            self.print(f"{self.run_dir}: stopped at iteration {st.iteration} after {st.timing.own_total:.1f} s of "
                       f"training (train.max_seconds={tc.max_seconds:g})")
        for h in self.hooks:
            h.on_end(ctx)
        return self._finish(ctx.stopping)

    def _finish(self, stopped: str | None) -> dict:
        """The run's summary (`stopped`: the budget that ended it), written to summary.json."""
        summary = summarize(self.state, self.run_dir, self.device, self.world, self.step.fast, stopped,
                            getattr(self.data, "left_out_images", 0))
        if self.main:
            ck.atomic_write_json(self.run_dir / "summary.json", summary)
        return summary



def stop_reason(st: ck.TrainState, tc, world: int, mean, device) -> str | None:
    """"iters" / "max_seconds" when this iteration is the last one, else None. Data-parallel ranks time
    themselves, so with several processes they agree on train.max_seconds at log points (one collective,
    `mean`, the same iteration on every rank): any rank past the budget stops them all."""
    if world == 1 or tc.max_seconds is None or st.iteration >= tc.iters:
        return st.timing.budget_reached(st.iteration, tc.iters, tc.max_seconds)
    if st.iteration % tc.log_every:
        return None
    over = torch.tensor(float(st.timing.own_total >= tc.max_seconds), device=device)
    return "max_seconds" if float(mean(over)) > 0 else None


def summarize(st: ck.TrainState, run_dir: Path, device, processes: int, fast, stopped: str | None,
              left_out_images: int = 0) -> dict:
    """summary.json of a run in `st` (`accounting.run_summary`; `fast`: the fast path it trained with;
    left_out_images: unreadable images data.bad_images=skip left out, recorded when there are any)."""
    f = st.facts
    return run_summary(run_dir=str(run_dir), iteration=st.iteration, stopped=stopped, phase=st.phase,
                       timing=st.timing, dense_size=f.dense_size, size=None if st.phase == "dense" else size_of(st.model),
                       ticket=f.ticket.to_dict() if f.ticket else None,
                       pruned_from=f.pruned_from.to_dict() if f.pruned_from else None, device=str(device),
                       processes=processes, fast_path=fast.to_dict(), skipped_steps=f.skipped_steps or 0,
                       compile_decisions=f.compile_decisions or None) | (
        {"left_out_images": left_out_images} if left_out_images else {})


def nonfinite_error(run_dir: Path, iteration: int, what: str) -> NonFiniteError:
    last = ck.latest_checkpoint(run_dir)
    return NonFiniteError(
        f"iteration {iteration}: {what}; stopped without writing a checkpoint. "
        + (f"The newest good checkpoint is {last.name}: resume it with a smaller train.lr or train.grad_clip > 0, "
           "or train.nonfinite=skip" if last else "No checkpoint was written: lower train.lr or set train.grad_clip > 0"))


def interrupted(signum: int, iteration: int, run_dir: Path) -> Interrupted:
    return Interrupted(f"stopped by {signal.Signals(signum).name} at iteration {iteration}; its checkpoint is saved: "
                       f"continue with --resume {run_dir}", code=128 + signum)
