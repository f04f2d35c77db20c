"""The training loop: iterations, timing, logging and checkpoint cadence, and hooks.

One `Trainer` runs one run folder. What kind of run it is (`config.RunSpec`) decides the first model
(the dense preset, or a pruned finished run for the dense-then-prune baselines) and the hooks (the
Early-Bird search, `search.EarlyBirdHook`). Everything that is training state lives in one
`checkpoint.TrainState`, saved every `train.ckpt_every` iterations and restored exactly on resume:
every batch, timestep draw and noise draw is a function of the seed and the iteration.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ck
from .accounting import LossMeter, run_summary
from .config import Config, RunSpec, dump_yaml, identity_changes, run_identity
from .data import BatchStream, iterations_per_epoch, load_training_data, to_device
from .diffusion import DiffusionLoss, class_dropout
from .distributed import make_dist, stop_requests
from .errors import ConfigError, DataError, Interrupted, NonFiniteError
from .hooks import CallbackHook, Hook
from .models import build_from_config, preset_classes, size_of
from .step import EMA, TrainStep, apply_hparams, lr_factor, make_optimizer, prepare_model, resolve_fast_path
from .tracking import SampleGridHook


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False, callbacks: list | None = None,
                 group=None):
        """callbacks: functions f(trainer) called after every iteration. group: a torch.distributed process
        group to train in (a TA-EB region branch); by default accelerate decides (one process, or the
        whole world under accelerate launch / torchrun)."""
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.spec = RunSpec.of(cfg)
        if self.spec.kind == "ta-eb":
            raise ConfigError("this config has 'regions' (a TA-EB run): train it with `ebdiff ta-eb`")
        self.dist = make_dist(cfg.train.device, group)
        self.device, self.rank, self.world = self.dist.device, self.dist.rank, self.dist.world
        self.main = self.rank == 0
        if cfg.train.batch_size % self.world:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by {self.world} processes")
        self.local_batch = cfg.train.batch_size // self.world
        self.loss = DiffusionLoss.from_config(cfg.diffusion, self.device)
        self.lr_at = lr_factor(cfg.train.lr_schedule, cfg.train.lr_warmup, cfg.train.iters)
        self.hooks: list[Hook] = [CallbackHook(f) for f in callbacks or []]
        if cfg.train.sample_every:
            self.hooks.append(SampleGridHook(cfg.train.sample_every))
        self.state: ck.TrainState | None = None
        self.tracker, self.meter = None, None
        self.classes = preset_classes(cfg.model.preset, cfg.model.num_classes)  # None: unconditional
        from .compile_cache import CompileCache

        self.compile_cache = CompileCache.from_setting(cfg.train.compile_cache, self.device)

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.cfg
        self.data = load_training_data(cfg.data, cfg.model.preset, self.device, self.main and cfg.train.progress,
                                       model=cfg.model)
        if len(self.data) < cfg.train.batch_size:
            raise DataError(f"dataset of {len(self.data)} images is smaller than one batch (train.batch_size="
                            f"{cfg.train.batch_size})")
        self.ipe = iterations_per_epoch(len(self.data), self.local_batch, self.world)
        torch.manual_seed(cfg.train.seed + self.rank)
        np.random.seed((cfg.train.seed + self.rank) % 2**32)
        facts, saved, plan, phase = {"image_shape": list(self.data.shape)}, None, None, "dense"
        if self.data.latent is not None:  # what decodes this run's samples: autoencoder, scale
            facts["latent"] = self.data.latent
        if self.resume:
            ckpt, model, meta, saved = ck.read_for_resume(self.run_dir, log=self.print)
            changes = identity_changes(meta.get("identity") or {"model.preset": meta["preset"]}, run_identity(cfg))
            if changes:
                raise ConfigError(f"--resume {self.run_dir}: {'; '.join(changes)}: these settings define the model "
                                  f"or data of its checkpoint {ckpt.name} and cannot change; start a new run instead")
            phase, plan = meta.get("phase", "dense"), meta.get("plan")
            facts.update({k: meta.get(k) for k in ("ticket", "dense_size", "pruned_from", "skipped_steps")})
        elif self.spec.kind == "prune-from-run":
            from .baselines import prune_from_run

            t0 = time.perf_counter()
            model, plan, facts["pruned_from"] = prune_from_run(cfg, self.device, self.score_probe, self.print)
            phase, extract_s = "pruned", time.perf_counter() - t0
        else:
            model = build_from_config(cfg.model)
        if self.classes is not None:
            self.data.check_labels(self.classes)
        if self.main:  # records past the state training continues from (a resume's checkpoint, or 0: a run
            # restarted after dying before its first checkpoint) are trained and logged again: no duplicates
            ck.truncate_log(self.run_dir / ck.METRICS_FILE, int(meta["iteration"]) if self.resume else 0)
        self.adopt(model.to(self.device), phase, plan)
        st = self.state
        st.facts.update(facts)
        if self.spec.searches and phase == "dense" and not st.facts.get("ticket"):
            from .search import EarlyBirdHook

            hook = EarlyBirdHook(self)
            st.search = hook.search
            self.hooks.append(hook)
        if cfg.train.eval_every is not None:
            from .training_eval import EvalHook

            self.hooks.append(EvalHook(self))
        if saved is not None:
            st.restore(ckpt, saved)
            for change in apply_hparams(st.optimizer, cfg.train, cfg.train.lr * self.lr_at(st.iteration)):
                self.print(f"resume: {change}")
        elif self.spec.kind == "prune-from-run":
            st.timing.extract_s += extract_s
        if not st.facts.get("dense_size"):
            st.facts["dense_size"] = size_of(model if plan is None else build_from_config(cfg.model))
        st.facts["identity"] = run_identity(cfg)
        if self.main:
            ck.atomic_write_text(self.run_dir / "config.yaml", dump_yaml(cfg))

    @property
    def dependency_s(self) -> float:
        """Training time this run depends on but did not spend itself: the dense run a prune-from-run
        baseline was cut from (0 otherwise)."""
        pf = self.state.facts.get("pruned_from") or {}
        return float(pf.get("train_s") or 0.0)

    @property
    def train_s(self) -> float:
        """Training seconds so far, as the speed-up counts them: own training plus the dependency."""
        return self.state.timing.own_total + self.dependency_s

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

    def adopt(self, model: nn.Module, phase: str, plan: list | None) -> None:
        """Train `model` from here on (the dense preset, a ticket, a pruned model): its fast-path layout,
        a new optimizer, EMA and compiled step (one per model shape)."""
        tc = self.cfg.train
        self.fast = resolve_fast_path(tc, self.device, self.world)
        prepare_model(model, self.fast)
        opt = make_optimizer(model.parameters(), tc, self.fast)
        self.model_p = self.dist.prepare_model(model)  # DDP when several processes
        ema = EMA.from_config(model, tc)
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
        st = self.state
        rec = {"iter": st.iteration, "phase": st.phase, **d}
        self.print(d["reason"])
        self.log({"event": "compile_decision", **rec})
        st.facts.setdefault("compile_decisions", []).append(rec)

    def score_probe(self, timesteps: int, batch: int):
        """The fixed batch gradient criteria score on (so that masks differ only through the weights)."""
        from .pruning import ScoreProbe

        return ScoreProbe.of(self.data, batch, self.loss, timesteps, self.cfg.train.seed, self.device,
                             labels=self.classes is not None)

    # ------------------------------------------------------------------ output
    def print(self, msg: str) -> None:
        if self.main:
            from tqdm.auto import tqdm

            tqdm.write(msg)

    def log(self, rec: dict) -> None:
        """One record to metrics.jsonl (the source of truth), mirrored to the tracker (train.log_with)."""
        if self.main:
            with open(self.run_dir / ck.METRICS_FILE, "a") as f:
                f.write(ck.json_line(rec))
            if self.tracker is not None:
                self.tracker.log(rec, rec.get("iter", self.state.iteration))

    def save(self) -> None:
        bad = ck.nonfinite_tensor(self.state.model, self.state.ema.module)
        if bad is not None:
            self._nonfinite(f"weight '{bad}' is not finite")
        self.dist.barrier()
        if self.main:
            self.state.timing.wall_s = time.perf_counter() - self._wall0
            self.state.save(self.run_dir, self.cfg.train.keep_last, self.model_meta())

    def model_meta(self) -> dict:
        """What rebuilds the trained model from a checkpoint or snapshot (with its plan), and decodes its
        samples (a latent run's autoencoder and scale)."""
        return {"preset": self.cfg.model.preset, "dropout": self.cfg.model.dropout, "num_classes": self.classes,
                "latent": self.state.facts.get("latent")}

    def _nonfinite(self, what: str) -> None:
        last = ck.latest_checkpoint(self.run_dir)
        raise NonFiniteError(
            f"iteration {self.state.iteration}: {what}; stopped without writing a checkpoint. "
            + (f"The newest good checkpoint is {last.name}: resume it with a smaller train.lr or train.grad_clip > 0, "
               "or train.nonfinite=skip" if last else "No checkpoint was written: lower train.lr or set train.grad_clip > 0"))

    # ------------------------------------------------------------------ loop
    def _step(self, x0: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # every random draw of an iteration is a function of (seed, iteration, rank): exact resume
        seed = (self.cfg.train.seed * 1_000_003 + self.state.iteration) * 64 + self.rank
        t = to_device(self.loss.timesteps(x0.shape[0], generator=torch.Generator().manual_seed(seed)), self.device)
        self.noise_gen.manual_seed(seed)
        noise = torch.randn(x0.shape, generator=self.noise_gen, device=self.device)
        if labels is None:
            return self.step(x0, t, noise)
        return self.step(x0, t, noise, class_dropout(labels, self.cfg.model.class_dropout, self.classes, seed))

    def run(self) -> dict:
        """Train to train.iters under the run folder's lock; SIGINT/SIGTERM/SIGHUP save a checkpoint and stop."""
        created = self.main and not self.run_dir.exists()
        with ck.RunLock(self.run_dir, "train") if self.main else contextlib.nullcontext():
            try:
                self._setup()
            except BaseException:
                if created:  # a failed start leaves no half-made run folder
                    shutil.rmtree(self.run_dir, ignore_errors=True)
                raise
            if self.main and self.cfg.train.log_with != "none":
                from .tracking import Tracker

                self.tracker = Tracker(self.cfg.train.log_with, self.run_dir, self.cfg.to_dict())
            try:
                with stop_requests() as stop:
                    return self._loop(stop)
            finally:
                if self.tracker is not None:
                    self.tracker.close()

    def _loop(self, stop: list[int]) -> dict:
        from .progress import progress_bar

        tc, st = self.cfg.train, self.state
        done = st.timing.budget_reached(st.iteration, tc.iters, tc.max_seconds)
        if done:
            self.print(f"{self.run_dir}: already trained to {st.iteration} iterations" + (
                f" ({st.timing.own_total:.0f} s of training, train.max_seconds={tc.max_seconds:g})"
                if done == "max_seconds" else ""))
            return self._finish(done)  # a crash between the last checkpoint and the summary left none
        batches = BatchStream(self.data, self.local_batch, tc.seed, self.device, self.rank, self.world,
                              self.cfg.data.num_workers, labels=self.classes is not None)(st.iteration)
        self.model_p.train()
        bar = progress_bar(total=tc.iters, initial=st.iteration, disable=not (self.main and tc.progress), desc=st.phase,
                   dynamic_ncols=True)
        self._wall0, self.stopping = time.perf_counter() - st.timing.wall_s, None
        self.meter = LossMeter(self.device, st.iteration)
        for h in self.hooks:
            h.on_start(self)
        while self.stopping is None:
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
            self.stopping = self._stop_reason()
            if st.iteration % tc.log_every == 0 or self.stopping:
                rec = self.meter.interval(st.iteration, tc.batch_size, self.dist.mean)
                if not math.isfinite(rec.get("loss", 0.0)):
                    self._nonfinite(f"the training loss is {rec['loss']} (not finite)")
                if "skipped_steps" in rec:  # train.nonfinite=skip dropped steps in this interval
                    st.facts["skipped_steps"] = (st.facts.get("skipped_steps") or 0) + rec["skipped_steps"]
                self.log({"iter": st.iteration, **rec, "wall_s": time.perf_counter() - self._wall0,
                          "lr": st.optimizer.param_groups[0]["lr"], "phase": st.phase})
                bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4f}", img_s=f"{rec['images_per_s']:.0f}")
            for h in self.hooks:
                h.after_step(self)
            bar.set_description(st.phase)
            if st.iteration % tc.ckpt_every == 0 or self.stopping or stop:
                self.save()
            if stop:
                bar.close()
                name = signal.Signals(stop[0]).name
                raise Interrupted(f"stopped by {name} at iteration {st.iteration}; its checkpoint is saved: continue "
                                  f"with --resume {self.run_dir}", code=128 + stop[0])
        bar.close()
        if self.stopping == "max_seconds":
            self.print(f"{self.run_dir}: stopped at iteration {st.iteration} after {st.timing.own_total:.1f} s of "
                       f"training (train.max_seconds={tc.max_seconds:g})")
        for h in self.hooks:
            h.on_end(self)
        return self._finish(self.stopping)

    def _finish(self, stopped: str | None) -> dict:
        """The run's summary (`stopped`: the budget that ended it), written to summary.json."""
        summary = self.summary(stopped)
        if self.main:
            ck.atomic_write_json(self.run_dir / "summary.json", summary)
        return summary

    def _stop_reason(self) -> str | None:
        """"iters" / "max_seconds" when this iteration is the last one, else None. Data-parallel ranks time
        themselves, so with several processes they agree on train.max_seconds at log points (one collective,
        the same iteration on every rank): any rank past the budget stops them all."""
        st, tc = self.state, self.cfg.train
        if self.world == 1 or tc.max_seconds is None or st.iteration >= tc.iters:
            return st.timing.budget_reached(st.iteration, tc.iters, tc.max_seconds)
        if st.iteration % tc.log_every:
            return None
        over = torch.tensor(float(st.timing.own_total >= tc.max_seconds), device=self.device)
        return "max_seconds" if float(self.dist.mean(over)) > 0 else None

    def summary(self, stopped: str | None = None) -> dict:
        st = self.state
        size = None if st.phase == "dense" else size_of(st.model)
        left_out = getattr(self.data, "left_out_images", 0)  # unreadable images data.bad_images=skip left out
        return {**run_summary(run_dir=str(self.run_dir), iteration=st.iteration, stopped=stopped, phase=st.phase,
                           timing=st.timing,
                           dense_size=st.facts.get("dense_size"), size=size, ticket=st.facts.get("ticket"),
                           pruned_from=st.facts.get("pruned_from"), device=str(self.device), processes=self.world,
                           fast_path=self.step.fast.to_dict(), skipped_steps=st.facts.get("skipped_steps") or 0,
                           compile_decisions=st.facts.get("compile_decisions")),
                **({"left_out_images": left_out} if left_out else {})}


def train(cfg: Config, run_dir: str | Path, resume: bool = False) -> dict:
    """Train (or resume) one run folder; returns its summary (the dict written to summary.json)."""
    return Trainer(cfg, run_dir, resume=resume).run()
