"""The training loop: dense DDPM training, with online Early-Bird search and ticket training.

One `Trainer` runs one run folder. It trains on one device or under `accelerate launch`/`torchrun`
(data parallel through accelerate), logs `metrics.jsonl`, checkpoints every `train.ckpt_every`
iterations and resumes exactly: every batch, timestep draw and noise draw is a function of the seed
and the iteration, and the global RNG (dropout) is saved with the optimizer.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ck
from .config import Config, dump_yaml
from .data import BatchStream, iterations_per_epoch, load_dataset, to_device, to_model_range
from .diffusion import Schedule, loss_weights, make_timestep_sampler
from .earlybird import EarlyBirdDetector
from .errors import CheckpointError, ConfigError
from .masks import ChannelMask, distance_matrix
from .models import build_model, count_macs_params, format_count, preset_shape
from .pruning import GRADIENT_CRITERIA
from .step import TrainStep, make_optimizer, prepare_model, resolve_fast_path


class EMA:
    """Exponential moving average of a model's floating-point state, kept as a full module copy."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self._refresh(model)

    def _refresh(self, model: nn.Module) -> None:
        self._src = [p for p in model.state_dict().values() if p.is_floating_point()]
        self._dst = [p for p in self.module.state_dict().values() if p.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay
        if self.warmup:
            d = min(d, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._dst, self._src, 1.0 - d)


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available (use train.device=cpu)")
    return name


def _rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(
        np.frombuffer(json.dumps(_np_state_jsonable()).encode(), dtype=np.uint8).copy())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _np_state_jsonable() -> list:
    s = np.random.get_state()
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    if "numpy" in st:
        s = json.loads(bytes(st["numpy"].numpy()).decode())
        np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


class AccelerateDist:
    """accelerate places the process (CPU, one GPU, or a rank under accelerate launch / torchrun) and
    wraps DDP over the whole world. Precision and compilation are the TrainStep's, not accelerate's."""

    def __init__(self, device: str):
        from accelerate import Accelerator

        self.acc = Accelerator(cpu=device == "cpu", mixed_precision="no")
        self.device = self.acc.device
        self.rank, self.world = self.acc.process_index, self.acc.num_processes

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return self.acc.prepare_model(model)

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(x, "mean")


class GroupDist:
    """Data parallelism inside one torch.distributed process group (a TA-EB region branch)."""

    def __init__(self, group, device: str):
        import os

        import torch.distributed as dist

        self.group, self._dist = group, dist
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", 0))
            self.device = torch.device("cuda", local % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, process_group=self.group)

    def barrier(self) -> None:
        if self.world > 1:
            self._dist.barrier(group=self.group)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        y = x.clone()
        self._dist.all_reduce(y, group=self.group)
        return y / self.world


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False, callbacks: list | None = None,
                 group=None):
        """callbacks: functions f(trainer) called after every iteration (studies, custom logging).
        group: a torch.distributed process group to train in (TA-EB: one group per region branch);
        by default accelerate decides (one process, or the whole world under accelerate/torchrun)."""
        self.callbacks = list(callbacks or [])
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        device = _resolve_device(cfg.train.device)
        self.dist = GroupDist(group, device) if group is not None else AccelerateDist(device)
        self.device = self.dist.device
        self.rank, self.world, self.main = self.dist.rank, self.dist.world, self.dist.rank == 0
        if cfg.train.batch_size % self.world:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by {self.world} processes")
        self.local_batch = cfg.train.batch_size // self.world
        self.schedule = Schedule.from_config(cfg.diffusion)
        abar = self.schedule.alphas_cumprod
        self._sqrt_ab = abar.sqrt().float().to(self.device)
        self._sqrt_1mab = (1 - abar).sqrt().float().to(self.device)
        w = loss_weights(cfg.diffusion, self.schedule)
        self._loss_w = None if w is None else w.float().to(self.device)
        self.tsampler = make_timestep_sampler(cfg.diffusion)
        self.resume = resume

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.cfg
        c, size = preset_shape(cfg.model.preset)
        size = cfg.data.image_size or size
        self.data = load_dataset(cfg.data, size, progress=self.main and cfg.train.progress)
        if self.data.shape[0] != c:
            raise ConfigError(f"model.preset={cfg.model.preset} takes {c}-channel images but data.name="
                              f"{cfg.data.name} gives {self.data.shape[0]} channels")
        if self.data.images is not None and self.device.type == "cuda":
            self.data.to(self.device)  # small datasets live on the GPU: no loader in the hot loop
        self.ipe = iterations_per_epoch(len(self.data), self.local_batch, self.world)
        torch.manual_seed(cfg.train.seed + self.rank)
        np.random.seed((cfg.train.seed + self.rank) % 2**32)
        self.model = build_model(cfg.model.preset, cfg.model.dropout).to(self.device)
        self.phase = "dense"
        self.plan = None
        self.iteration = 0
        self.timing = {"wall_s": 0.0, "search_s": 0.0, "check_s": 0.0, "extract_s": 0.0, "sparse_s": 0.0, "dense_s": 0.0}
        self.eb_enabled = cfg.early_bird.ratio is not None
        self.eb_masks: list[ChannelMask] = []
        self.eb_iters: list[int] = []
        self.eb_check_costs: list[float] = []
        self.eb_ticket: dict | None = None
        self.detector = None
        self.dense_size = None
        self.pruned_from: dict | None = None
        state = None
        if self.resume:
            ckpt = ck.latest_checkpoint(self.run_dir)
            if ckpt is None:
                raise CheckpointError(f"--resume: {self.run_dir} has no checkpoint to resume from")
            meta = ck.read_meta(ckpt)
            self.phase = meta.get("phase", "dense")
            self.plan = [(n, list(i)) for n, i in meta["plan"]] if meta.get("plan") else None
            self.model = ck.load_weights(ck.build_from_meta(meta), ckpt / "model.safetensors").to(self.device)
            state = ck.load_state(ckpt)
            self.iteration = int(state["iteration"])
            self.timing.update(state.get("timing", {}))
            self.eb_ticket = meta.get("ticket")
            self.dense_size = meta.get("dense_size")
            self.pruned_from = meta.get("pruned_from")
            if (ckpt / "earlybird.npz").is_file():
                self._load_eb(ckpt / "earlybird.npz")
        elif cfg.prune.from_run is not None:
            self._prune_from_run()
        self._make_optimizer()
        self.ema = EMA(self.model, cfg.train.ema_decay, cfg.train.ema_warmup)
        if state is not None:
            ck.load_weights(self.ema.module, ckpt / "ema.safetensors")
            self.ema.updates = int(state.get("ema_updates", 0))
            self.opt.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"])
        self._build_step()
        if self.dense_size is None:
            dense = self.model if self.plan is None else build_model(cfg.model.preset)
            m, p = count_macs_params(dense)
            self.dense_size = {"params": p, "macs": m}
        if self.eb_enabled and self.phase == "dense":
            self._start_search()

    def _make_optimizer(self) -> None:
        self.fast = resolve_fast_path(self.cfg.train, self.device, self.world)
        prepare_model(self.model, self.fast)
        self.opt = make_optimizer(self.model.parameters(), self.cfg.train, self.fast)
        self.model_p = self.dist.prepare_model(self.model)  # DDP when several processes

    def _build_step(self) -> None:
        """A compiled step per model shape: the ticket gets its own after extraction."""
        self.step = TrainStep(self.model_p, self.model, self.opt, self.ema, self._sqrt_ab, self._sqrt_1mab,
                              self.cfg.diffusion.loss_reduction, self.cfg.train.grad_clip, self.fast,
                              self._loss_w)
        self.noise_gen = torch.Generator(device=self.device)

    # ------------------------------------------------------------------ early bird
    def _start_search(self) -> None:
        from .pruning import PruningEngine

        eb = self.cfg.early_bird
        self.check_every = self.ipe if eb.check_every == "epoch" else int(eb.check_every)
        source = self.ema.module if eb.mask_source == "ema" else self.model
        self.engine = PruningEngine(source)
        if self.detector is None:
            self.detector = EarlyBirdDetector(eta=eb.eta, queue=eb.queue)
        self.taylor_x0 = self._score_batch() if eb.criterion in GRADIENT_CRITERIA else None

    def _score_batch(self) -> torch.Tensor:
        """One fixed batch for gradient scores, so that masks differ only through the weights."""
        n = min(self.cfg.early_bird.taylor_batch, len(self.data))
        if self.data.images is not None:
            x = self.data.images[:n]
        else:
            x = torch.stack([self.data.files_dataset[i] for i in range(n)])
        return to_model_range(x.to(self.device))

    # ------------------------------------------------------------------ dense-then-prune baselines
    def _prune_from_run(self) -> None:
        """Train-prune-finetune / Scratch: prune a finished dense run once (its EMA or online weights)
        and train the pruned model from here. Its accounting carries the dense run's training time."""
        from .pruning import PruningEngine, extract

        pc = self.cfg.prune
        src = Path(pc.from_run)
        ckpt = ck.latest_checkpoint(src)
        if ckpt is None:
            raise CheckpointError(f"prune.from_run={src}: no checkpoint there (train the dense model first)")
        meta = ck.read_meta(ckpt)
        if meta.get("plan"):
            raise ConfigError(f"prune.from_run={src} holds a pruned model ({meta.get('phase')}); it must be a dense run")
        if meta["preset"] != self.cfg.model.preset:
            raise ConfigError(f"prune.from_run={src} is a model.preset={meta['preset']} run; this run has "
                              f"model.preset={self.cfg.model.preset}")
        summary = ck.read_json(src / "summary.json")
        if summary is None or summary.get("iterations") != meta["iteration"]:
            self._print(f"warning: {src} has no finished summary for its latest checkpoint "
                        f"(iteration {meta['iteration']}); its time is taken from the checkpoint")
        src_time = (summary or {}).get("time_s", {}).get("train_total")
        if src_time is None:
            src_time = ck.load_state(ckpt).get("timing", {}).get("dense_s")
        t0 = time.perf_counter()
        dense = ck.build_from_meta(meta)
        weights = "ema.safetensors" if pc.weights == "ema" else "model.safetensors"
        ck.load_weights(dense, ckpt / weights)
        dense = dense.to(self.device).train()
        engine = PruningEngine(dense)
        x0 = self._score_batch() if pc.criterion in GRADIENT_CRITERIA else None
        mask = self._criterion_mask(engine, pc.criterion, pc.ratio, x0)
        plan = engine.plan(mask)
        small = extract(dense, plan, reinit=pc.reinit,
                        init_fn=lambda: build_model(self.cfg.model.preset, self.cfg.model.dropout))
        self.model, self.plan, self.phase = small.to(self.device).train(), plan, "pruned"
        self.timing["extract_s"] += time.perf_counter() - t0
        self.pruned_from = {"run": str(src), "checkpoint": ckpt.name, "iteration": int(meta["iteration"]),
                            "train_s": src_time, "criterion": pc.criterion, "ratio": pc.ratio,
                            "weights": pc.weights, "reinit": pc.reinit,
                            "method": "scratch" if pc.reinit else "prune-finetune",
                            "pruned_channel_fraction": mask.pruned_fraction}
        macs, params = count_macs_params(self.model)
        what = "Scratch (structure only, re-initialised)" if pc.reinit else f"prune+finetune ({pc.criterion})"
        self._print(f"{what}: pruned {src} at iteration {meta['iteration']} to {format_count(params)} params, "
                    f"{format_count(macs)} MACs")

    def _load_eb(self, path: Path) -> None:
        eb = self.cfg.early_bird
        with np.load(path) as z:
            sizes = tuple(int(s) for s in z["sizes"])
            bits = torch.from_numpy(z["masks"]).bool()
            self.eb_masks = [ChannelMask(b.clone(), sizes) for b in bits]
            self.eb_iters = z["iterations"].tolist()
            self.eb_check_costs = z["check_seconds"].tolist()
        self.detector = EarlyBirdDetector(eta=eb.eta, queue=eb.queue)
        for m in self.eb_masks:  # replay: same FIFO, same history
            self.detector.update(m)

    def _save_eb(self, path: Path) -> None:
        with open(path, "wb") as f:
            self._save_eb_to(f)

    def _save_eb_to(self, path) -> None:
        if not self.eb_masks:
            np.savez(path, masks=np.zeros((0, 0), bool), sizes=np.zeros(0, np.int64),
                     iterations=np.zeros(0, np.int64), check_seconds=np.zeros(0))
            return
        np.savez(path, masks=torch.stack([m.bits for m in self.eb_masks]).numpy(),
                 sizes=np.array(self.eb_masks[0].sizes, np.int64), iterations=np.array(self.eb_iters, np.int64),
                 check_seconds=np.array(self.eb_check_costs))

    def _criterion_mask(self, engine, criterion: str, ratio: float, x0: torch.Tensor | None = None) -> ChannelMask:
        """The mask `criterion` gives at `ratio` on engine.model's current weights. Gradient criteria
        score the fixed batch x0 on this run's timesteps and leave no gradients behind."""
        from .pruning import accumulate_taylor_grads

        eb = self.cfg.early_bird
        if criterion in GRADIENT_CRITERIA:
            accumulate_taylor_grads(engine.model, self.schedule, x0, eb.taylor_timesteps,
                                    eb.diff_threshold if criterion == "diff-pruning" else None,
                                    seed=self.cfg.train.seed, t_range=(self.tsampler.lo, self.tsampler.hi))
            mask = engine.mask(criterion, ratio)
            engine.model.zero_grad(set_to_none=True)
            return mask
        return engine.mask(criterion, ratio, seed=self.cfg.train.seed)

    def _compute_mask(self) -> ChannelMask:
        eb = self.cfg.early_bird
        mask = self._criterion_mask(self.engine, eb.criterion, eb.ratio, self.taylor_x0)
        if eb.criterion in GRADIENT_CRITERIA and self.engine.model is not self.model:
            self.engine.model.requires_grad_(False)  # the EMA copy stays frozen between checks
        return mask

    def _check(self) -> bool:
        """One Early-Bird check; returns True when the ticket was extracted."""
        eb = self.cfg.early_bird
        t0 = time.perf_counter()
        if eb.mask_source == "ema":
            self.engine.model.requires_grad_(eb.criterion in GRADIENT_CRITERIA)
        mask = self._compute_mask()
        cost = time.perf_counter() - t0
        self.eb_masks.append(mask)
        self.eb_iters.append(self.iteration)
        self.eb_check_costs.append(cost)
        self.timing["check_s"] += cost
        ticket = self.detector.update(mask)
        d = self.detector.history[-1]
        self._log({"event": "eb_check", "iter": self.iteration, "check": self.detector.checks - 1,
                   "max_distance": None if math.isnan(d) else d, "check_s": cost,
                   "pruned_fraction": mask.pruned_fraction})
        limit = eb.max_search_iters
        missed = limit is not None and self.iteration >= limit
        if ticket is None and not missed:
            return False
        if ticket is None and eb.on_miss == "continue-dense":
            self._print(f"no Early-Bird ticket within {limit} iterations (eta={eb.eta}); continuing dense training")
            self.eb_ticket = {"found": False, "iteration": self.iteration, "checks": self.detector.checks}
            self._log({"event": "eb_miss", "iter": self.iteration})
            self.eb_enabled = False
            self._write_eb_artifacts(None)
            return False
        self._extract(mask, ticket)
        return True

    def _extract(self, mask: ChannelMask, ticket) -> None:
        from .pruning import extract

        eb = self.cfg.early_bird
        t0 = time.perf_counter()
        plan = self.engine.plan(mask)
        dense_src = self.model
        small = extract(dense_src, plan, reinit=eb.reinit,
                        init_fn=lambda: build_model(self.cfg.model.preset, self.cfg.model.dropout))
        small.train()
        self.model, self.plan, self.phase = small, plan, "ticket"
        del self.engine
        self._make_optimizer()
        self.ema = EMA(self.model, self.cfg.train.ema_decay, self.cfg.train.ema_warmup)
        self._build_step()
        macs, params = count_macs_params(self.model)
        self.timing["extract_s"] += time.perf_counter() - t0
        self.timing["search_s"] = self.timing["dense_s"]
        self.eb_ticket = {
            "found": ticket is not None,
            "check": self.detector.checks - 1,
            "iteration": self.iteration,
            "max_distance": ticket.max_distance if ticket else None,
            "ratio": eb.ratio, "criterion": eb.criterion, "eta": eb.eta, "queue": eb.queue,
            "check_every": self.check_every, "mask_source": eb.mask_source, "reinit": eb.reinit,
            "search_seconds": self.timing["dense_s"] + self.timing["check_s"],
            "check_seconds_mean": float(np.mean(self.eb_check_costs)),
            "check_seconds_max": float(np.max(self.eb_check_costs)),
            "extract_seconds": self.timing["extract_s"],
            "dense": self.dense_size, "ticket": {"params": params, "macs": macs},
            "pruned_channel_fraction": mask.pruned_fraction,
        }
        self._log({"event": "ticket", **self.eb_ticket})
        self._write_eb_artifacts(self.eb_ticket)
        what = "ticket drawn" if ticket is not None else "no ticket in the search budget; extracting anyway"
        self._print(f"Early-Bird: {what} at iteration {self.iteration} (check {self.eb_ticket['check']}): "
                    f"{format_count(self.dense_size['params'])} -> {format_count(params)} params, "
                    f"{format_count(self.dense_size['macs'])} -> {format_count(macs)} MACs")

    def _write_eb_artifacts(self, ticket: dict | None) -> None:
        if not self.main:
            return
        from .report import plot_hamming

        self.run_dir.mkdir(parents=True, exist_ok=True)
        ck.atomic_save(self.run_dir / "masks.npz", self._save_eb)
        dm = distance_matrix(self.eb_masks).numpy()
        def _save_dm(p):
            with open(p, "wb") as f:
                np.save(f, dm)

        ck.atomic_save(self.run_dir / "hamming.npy", _save_dm)
        mark = ticket["check"] if ticket and ticket.get("found") else None
        plot_hamming(dm, self.run_dir / "hamming.png", mark=mark,
                     title=f"{self.cfg.early_bird.criterion} p={self.cfg.early_bird.ratio}")
        if ticket is not None:
            ck.atomic_write_json(self.run_dir / "ticket.json", ticket)

    # ------------------------------------------------------------------ logging
    def _print(self, msg: str) -> None:
        if self.main:
            from tqdm.auto import tqdm

            tqdm.write(msg)

    def _log(self, rec: dict) -> None:
        if self.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec, default=ck._json_default) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict:
        return {"preset": self.cfg.model.preset, "dropout": self.cfg.model.dropout, "phase": self.phase,
                "plan": self.plan, "ticket": self.eb_ticket, "dense_size": self.dense_size,
                "pruned_from": self.pruned_from,
                "image_shape": list(self.data.shape), "diffusion": self.cfg.to_dict()["diffusion"],
                "sample": self.cfg.to_dict()["sample"]}

    def save(self) -> None:
        self.dist.barrier()
        if not self.main:
            return
        self.timing["wall_s"] = time.perf_counter() - self._wall0
        state = {"iteration": self.iteration, "optimizer": self.opt.state_dict(), "rng": _rng_state(),
                 "timing": dict(self.timing), "ema_updates": self.ema.updates}
        extra = {}
        if self.eb_masks and self.phase == "dense":
            extra["earlybird.npz"] = self._save_eb
        ck.save_checkpoint(self.run_dir, self.iteration, self.model, self.ema.module,
                           self._meta(), state, self.cfg.train.keep_last, extra)

    # ------------------------------------------------------------------ loop
    def _step(self, x0: torch.Tensor) -> torch.Tensor:
        # every random draw of an iteration is a function of (seed, iteration, rank): exact resume
        seed = (self.cfg.train.seed * 1_000_003 + self.iteration) * 64 + self.rank
        g = torch.Generator().manual_seed(seed)
        t = to_device(self.tsampler(x0.shape[0], generator=g), self.device)
        self.noise_gen.manual_seed(seed)
        noise = torch.randn(x0.shape, generator=self.noise_gen, device=self.device)
        return self.step(x0, t, noise)

    def run(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ck.atomic_write_text(self.run_dir / "config.yaml", dump_yaml(cfg))
        self._setup()
        if self.iteration >= cfg.train.iters:
            self._print(f"{self.run_dir}: already trained to {self.iteration} iterations")
            return self.summary()
        stream = BatchStream(self.data, self.local_batch, cfg.train.seed, self.device, self.rank, self.world,
                             cfg.data.num_workers)
        batches = stream(self.iteration)
        self.model_p.train()
        bar = tqdm(total=cfg.train.iters, initial=self.iteration, disable=not (self.main and cfg.train.progress),
                   desc=self.phase, dynamic_ncols=True)
        loss_sum = torch.zeros((), device=self.device)
        n_loss, t_log, it_log = 0, time.perf_counter(), self.iteration
        wall0 = self._wall0 = time.perf_counter() - self.timing.get("wall_s", 0.0)
        while self.iteration < cfg.train.iters:
            t_step = time.perf_counter()
            loss_sum += self._step(next(batches))
            n_loss += 1
            self.iteration += 1
            if self.device.type == "cuda" and (self.iteration % cfg.train.log_every == 0):
                torch.cuda.synchronize()
            self.timing["dense_s" if self.phase == "dense" else "sparse_s"] += time.perf_counter() - t_step
            bar.update(1)
            for cb in self.callbacks:
                cb(self)
            if self.iteration % cfg.train.log_every == 0 or self.iteration == cfg.train.iters:
                loss = float(self.dist.mean(loss_sum)) / max(n_loss, 1)
                dt = time.perf_counter() - t_log
                ips = (self.iteration - it_log) * cfg.train.batch_size / max(dt, 1e-9)
                self._log({"iter": self.iteration, "loss": loss, "images_per_s": ips,
                           "wall_s": time.perf_counter() - wall0, "lr": self.opt.param_groups[0]["lr"],
                           "phase": self.phase})
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}")
                loss_sum.zero_()
                n_loss, t_log, it_log = 0, time.perf_counter(), self.iteration
            if self.eb_enabled and self.phase == "dense" and self.iteration % self.check_every == 0:
                if self._check():
                    bar.set_description("ticket")
            if self.iteration % cfg.train.ckpt_every == 0 or self.iteration == cfg.train.iters:
                self.save()
        bar.close()
        if self.eb_enabled and self.phase == "dense" and self.eb_ticket is None and self.main:
            self._print(f"no Early-Bird ticket was drawn in {self.iteration} iterations "
                        f"({self.detector.checks} checks, eta={cfg.early_bird.eta})")
            self._write_eb_artifacts(None)
        summary = self.summary()
        if self.main:
            ck.atomic_write_json(self.run_dir / "summary.json", summary)
        return summary

    def summary(self) -> dict:
        t = self.timing
        size = None
        if self.phase != "dense":
            m, p = count_macs_params(self.model)
            size = {"params": p, "macs": m}
        search_iters = self.eb_ticket["iteration"] if self.eb_ticket and self.phase == "ticket" else None
        own = t["dense_s"] + t["sparse_s"] + t["check_s"] + t["extract_s"]
        if self.pruned_from is not None:  # dense-then-prune: the dense run it started from is part of its cost
            dense_its, sparse_its = self.pruned_from["iteration"], self.iteration
            depends = self.pruned_from.get("train_s") or 0.0
        else:
            dense_its = search_iters if search_iters is not None else self.iteration
            sparse_its, depends = self.iteration - dense_its, 0.0
        return {
            "run_dir": str(self.run_dir),
            "iterations": self.iteration,
            "phase": self.phase,
            "dense_iterations": dense_its,
            "ticket_iterations": sparse_its,
            "dense": self.dense_size,
            "ticket": size,
            "ticket_info": self.eb_ticket,
            "pruned_from": self.pruned_from,
            "time_s": {**t, "own_total": own, "dependency_s": depends, "train_total": own + depends},
            "device": str(self.device), "processes": self.world, "fast_path": self.fast.to_dict(),
        }
