"""Evaluation during training: quality as a function of training time.

`EvalHook` (set `train.eval_every`) samples the EMA model every N iterations, or every N seconds of
training time ("120s"), with the run's sampler settings (`train.eval_steps` may use fewer steps;
never compiled: a point is a few batches), scores the images with the run's metric (`Scorer`:
FD-<dataset> on ebdiff's cached classifier, or Inception FID with `train.eval_metric=fid`) and logs
one record to `metrics.jsonl`:

    {"event": "eval", "iter": 400, "phase": "ticket", "train_s": 61.2, "own_train_s": 61.2,
     "dependency_s": 0.0, "eval_s": 3.1, "eval_total_s": 12.4, "metric": "FD-FMNIST", "value": 143.2, ...}

`train_s` is what the speed-up counts: the run's own training seconds plus, for a prune-from-run
baseline, the dense run it was cut from. Evaluation runs inside the loop's `paused()`: its seconds go to
`timing.eval_s`, never to the training time, the wall clock or images/s. Every point samples from the
same noise (sample.seed), so consecutive points differ only by the weights. The last iteration of
a call (train.iters or train.max_seconds) is always a point. The global RNG is left as it was, so a
run with evaluation trains exactly as one without.

TA-EB: a branch alone is not a model of the data (it covers its timesteps only), so each branch
saves its EMA weights at its points (`snapshots/snap-<iter>/`, an `eval_snapshot` record), and after
training `score_taeb_curve` scores the ensemble: point k routes each branch's k-th snapshot (a branch
with fewer points gives its last, final one); its training time is the longest of those branches'
times. The TA-EB curve is written to the TA-EB run's own metrics.jsonl.
"""

from __future__ import annotations

import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..backbones import eps_fn
from ..config import Config, RunSpec, load_config, parse_every
from ..core.regions import RegionRouter
from ..core.sampling import to_uint8
from ..progress import progress_bar
from ..runs import checkpoint as ck
from ..runs.folders import read_regions
from ..training.hooks import Hook
from .evaluate import Scorer, run_sample_config, sample_model, sampling_inputs
from .report import save_grid

SNAPSHOTS = "snapshots"
GRID = "samples_curve.png"  # the newest evaluation point's images (the report's sample grids)


@dataclass(frozen=True)
class Cadence:
    """When evaluation points fall: every `every` iterations ("iters") or seconds of training ("seconds")."""

    unit: str
    every: float

    @classmethod
    def of(cls, value) -> "Cadence | None":
        parsed = parse_every(value)
        return None if parsed is None else cls(*parsed)

    def position(self, iteration: int, train_s: float) -> float:
        return iteration if self.unit == "iters" else train_s

    def next_due(self, position: float) -> float:
        """The first multiple of `every` past `position` (after a point, or where a call starts)."""
        return (math.floor(position / self.every + 1e-9) + 1) * self.every


@contextmanager
def same_rng():
    """Run the block and put the global RNGs (torch, numpy, CUDA) back as they were: evaluation must not
    change what training draws next (dropout), or a run with evaluation would train differently."""
    state = ck.rng_state()
    try:
        yield
    finally:
        ck.set_rng_state(state)


def eval_sample_config(cfg: Config):
    """The run's diffusion and sampler settings for an evaluation point: train.eval_n images at
    train.eval_steps steps (default sample.steps), eager (no compilation for a few batches)."""
    return run_sample_config(cfg, n=cfg.train.eval_n, steps=cfg.train.eval_steps, compile="none")


def make_scorer(cfg: Config, device, progress: bool = False):
    tc = cfg.train
    return Scorer(cfg, tc.eval_metric, str(device), tc.eval_inception_weights, tc.eval_classifier_epochs, progress)


class EvalHook(Hook):
    """Evaluation points during training (`train.eval_every` of `cfg`); snapshots only in a TA-EB branch."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.cadence = Cadence.of(cfg.train.eval_every)
        self.snapshot_only = RunSpec.of(cfg).kind == "taeb-branch"
        self.scorer = None
        self.next = None
        self.last_iter = None

    def on_start(self, ctx) -> None:
        st = ctx.state
        self.next = self.cadence.next_due(self.cadence.position(st.iteration, st.timing.own_total))
        if not ctx.main:
            return
        if self.snapshot_only:  # snapshots past the checkpoint belong to records the resume dropped
            for d in sorted((ctx.run_dir / SNAPSHOTS).glob("snap-*")):
                if int(d.name.split("-")[1]) > st.iteration:
                    shutil.rmtree(d, ignore_errors=True)
        else:  # the classifier (trained once, cached) and the reference features, before training starts
            with ctx.paused(), same_rng():
                self.scorer = make_scorer(self.cfg, ctx.device, progress=self.cfg.train.progress)

    def after_step(self, ctx) -> None:
        st = ctx.state
        pos = self.cadence.position(st.iteration, st.timing.own_total)
        if pos < self.next and not ctx.stopping:
            return
        self.next = self.cadence.next_due(pos)
        if self.last_iter == st.iteration:
            return
        self.last_iter = st.iteration
        with ctx.paused(), same_rng():
            t0 = time.perf_counter()
            rec = self._snapshot(ctx) if self.snapshot_only else self._score(ctx)
            rec["eval_s"] = time.perf_counter() - t0
            ctx.barrier()  # data-parallel ranks wait for rank 0's evaluation here, not in a collective
        if ctx.main:
            rec = {"event": "eval_snapshot" if self.snapshot_only else "eval", "iter": st.iteration,
                   "phase": st.phase, "train_s": st.train_s, "own_train_s": st.timing.own_total,
                   "dependency_s": st.facts.dependency_s, **rec, "eval_total_s": st.timing.eval_s + rec["eval_s"]}
            ctx.log(rec)
            if not self.snapshot_only:
                ctx.print(f"eval at iteration {st.iteration} ({rec['train_s']:.1f} s of training): "
                          f"{rec['metric']} {rec['value']:.2f} ({rec['eval_s']:.1f} s)")

    def _score(self, ctx) -> dict:
        if not ctx.main:
            return {}
        dcfg, scfg = eval_sample_config(self.cfg)
        model = ctx.state.ema.module
        inputs, _ = sampling_inputs(model, ctx.arch, scfg, ctx.device, ctx.run_dir)
        x, speed = sample_model(eps_fn(model), tuple(ctx.state.facts.image_shape), dcfg, scfg, ctx.device,
                                progress=False, compile_cache=self.cfg.train.compile_cache, **inputs)
        m = self.scorer(x)
        save_grid(to_uint8(x[:64]), ctx.run_dir / GRID)
        return {"metric": m["name"], "value": m["value"], "kid": m["kid"], "n": scfg.n, "steps": scfg.steps,
                "extractor": m["extractor"], "weights": "ema", "sampling_s": speed["seconds"]}

    def _snapshot(self, ctx) -> dict:
        if not ctx.main:
            return {}
        st = ctx.state
        d = ctx.run_dir / SNAPSHOTS / f"snap-{st.iteration:09d}"
        meta = {**ctx.arch, "phase": st.phase, "plan": st.plan, "image_shape": list(st.facts.image_shape)}
        ck.write_model_folder(d, st.iteration, meta, {"ema.safetensors": st.ema.module})
        return {"snapshot": str(d.relative_to(ctx.run_dir))}


# ---------------------------------------------------------------------- TA-EB: the ensemble's curve
def ensemble_plan(branch_points: list[list[dict]]) -> list[dict]:
    """Pure: the ensemble's points from each branch's `eval_snapshot` records (in iteration order).
    Point k takes each branch's k-th snapshot, or its last one when the branch has fewer (it finished
    training); its training time is the longest of those branches' times (they train in parallel)."""
    if not branch_points or any(not pts for pts in branch_points):
        return []
    out = []
    for k in range(max(len(pts) for pts in branch_points)):
        members = [pts[min(k, len(pts) - 1)] for pts in branch_points]
        out.append({"point": k, "iters": [int(m["iter"]) for m in members],
                    "branch_train_s": [float(m["train_s"]) for m in members],
                    "train_s": max(float(m["train_s"]) for m in members),
                    "snapshots": [m["snapshot"] for m in members]})
    return out


def score_taeb_curve(run: Path, device: str = "cpu", progress: bool = True, log=print) -> list[dict]:
    """Score the TA-EB ensemble at every point of `ensemble_plan` not yet in RUN/metrics.jsonl (a point
    whose branches' snapshots changed since, after a resume to a longer budget, is scored again)."""

    run = Path(run)
    cfg = load_config(run / "config.yaml")
    regions, spec = read_regions(run)
    branches = [run / name for name in spec["members"]]
    points = [[r for r in ck.read_records(b / ck.METRICS_FILE) if r.get("event") == "eval_snapshot"] for b in branches]
    plan = ensemble_plan([sorted(p, key=lambda r: r["iter"]) for p in points])
    log_path = run / ck.METRICS_FILE
    old = {r["point"]: r for r in ck.read_records(log_path) if r.get("event") == "eval" and "point" in r}
    done = {k: r for k, r in old.items() if k < len(plan) and r.get("iters") == plan[k]["iters"]}
    todo = [p for p in plan if p["point"] not in done]
    if not todo:
        return [done[k] for k in sorted(done)]
    scorer = make_scorer(cfg, device, progress=False)
    dcfg, scfg = eval_sample_config(cfg)
    for p in progress_bar(todo, desc="scoring the TA-EB ensemble", disable=not progress):
        t0 = time.perf_counter()
        models = [ck.load_model(b / s, ema=True, device=device)[0] for b, s in zip(branches, p["snapshots"])]
        router = RegionRouter([eps_fn(m) for m in models], regions, spec["route"])
        meta = ck.read_meta(branches[0] / p["snapshots"][0])
        inputs, _ = sampling_inputs(models[0], meta, scfg, device, run)
        x, speed = sample_model(router, tuple(meta["image_shape"]), dcfg, scfg, device, progress=False,
                                compile_cache=cfg.train.compile_cache, **inputs)
        m = scorer(x)
        done[p["point"]] = {"event": "eval", "iter": max(p["iters"]), "point": p["point"], "iters": p["iters"],
                            "phase": "ta-eb", "ensemble": True, "train_s": p["train_s"],
                            "own_train_s": p["train_s"], "dependency_s": 0.0,
                            "branch_train_s": p["branch_train_s"], "metric": m["name"], "value": m["value"],
                            "kid": m["kid"], "n": scfg.n, "steps": scfg.steps, "extractor": m["extractor"],
                            "weights": "ema", "sampling_s": speed["seconds"], "eval_s": time.perf_counter() - t0}
        if p["point"] == len(plan) - 1:
            save_grid(to_uint8(x[:64]), run / GRID)
    recs = [done[k] for k in sorted(done)]
    others = [r for r in ck.read_records(log_path) if not (r.get("event") == "eval" and "point" in r)]
    ck.atomic_write_text(log_path, "".join(ck.json_line(r) for r in others + recs))
    last = recs[-1]
    log(f"TA-EB ensemble scored at {len(recs)} points ({len(todo)} new): last {last['metric']} {last['value']:.2f} "
        f"at {last['train_s']:.1f} s of training (longest branch)")
    return recs
