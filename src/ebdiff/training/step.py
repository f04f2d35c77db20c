"""One training step (forward, loss, backward, clip, optimizer, EMA) with the GPU fast path.

Shared by the trainer and `ebdiff bench`, so that the benchmark measures exactly what training
runs. The fast path is a set of switches, each with an `auto` default: on a GPU bf16 autocast,
channels_last, fused Adam, cuDNN autotuning and torch.compile (with CUDA graphs on one process); on
the CPU the plain fp32 eager path, which is also the one whose resume is bit-exact.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

from ..backbones import eps_call
from ..core.diffusion import DiffusionLoss
from ..errors import ConfigError
from . import autocompile


@dataclass(frozen=True)
class FastPath:
    bf16: bool = False
    channels_last: bool = False
    compile: str = "none"
    fused_optimizer: bool = False
    cudnn_benchmark: bool = False
    cuda_graph: bool = False  # the whole step (forward, backward, clip, Adam, EMA) replayed as one CUDA graph
    # train.compile=auto: `compile` is the mode to use if the planned iterations repay it (autocompile);
    # the step decides at its start and then runs with compile_auto off and compile set or "none"
    compile_auto: bool = False
    # inductor's channels-last layout optimisation forced on (train.layout_opt): its heuristic turns it off
    # for a UNet (convolutions with in >= 2 x out channels), and cuDNN then copies activations to NHWC
    layout_opt: bool = False

    def describe(self) -> str:
        parts = ["bf16" if self.bf16 else "fp32"]
        if self.channels_last:
            parts.append("channels_last")
        if self.compile != "none":
            parts.append(f"compile={self.compile}" + ("?" if self.compile_auto else ""))
        if self.layout_opt and self.compile != "none":
            parts.append("layout-opt")
        if self.fused_optimizer:
            parts.append("fused-adam")
        if self.cudnn_benchmark:
            parts.append("cudnn-benchmark")
        if self.cuda_graph:
            parts.append("whole-step-graph")
        return " + ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


EAGER_FP32 = FastPath()  # the reference stack's mode


def resolve_fast_path(tcfg, device: torch.device, world: int = 1) -> FastPath:
    """Turn train.* 'auto' switches into concrete choices for this device."""
    cuda = device.type == "cuda"
    mp = tcfg.mixed_precision
    if mp == "auto":
        bf16 = cuda and torch.cuda.is_bf16_supported()
    elif mp == "bf16":
        bf16 = True
    elif mp == "no":
        bf16 = False
    else:
        raise ConfigError(f"train.mixed_precision={mp} is not supported (use auto, bf16 or no)")
    cl = tcfg.channels_last
    cl = cuda if cl == "auto" else bool(cl)
    comp = tcfg.compile
    auto = comp == "auto" and cuda and world == 1  # several processes: each would decide alone; keep today's
    if comp == "auto":
        comp = ("reduce-overhead" if world == 1 else "default") if cuda else "none"
    fused = tcfg.fused_optimizer
    fused = cuda if fused == "auto" else bool(fused)
    if fused and not cuda:
        raise ConfigError("train.fused_optimizer=true needs a CUDA device")
    bench = tcfg.cudnn_benchmark
    bench = cuda if bench == "auto" else bool(bench)
    graph = bool(tcfg.cuda_graph)
    if graph:
        if not cuda:
            raise ConfigError("train.cuda_graph=true needs a CUDA device")
        if world > 1:
            raise ConfigError("train.cuda_graph=true runs on one process (DDP's collectives are not captured)")
        if tcfg.ema_warmup:
            raise ConfigError("train.cuda_graph=true needs train.ema_warmup=false (a captured step has one "
                              "fixed EMA decay)")
        if tcfg.compile == "auto":
            comp = "default"  # inductor's kernels inside our graph; its own CUDA graphs would nest
        if comp in ("reduce-overhead", "max-autotune"):
            raise ConfigError(f"train.cuda_graph=true with train.compile={comp}: both make CUDA graphs; use "
                              "train.compile=default (or none) with the whole-step graph")
    return FastPath(bf16=bf16, channels_last=cl, compile=comp, fused_optimizer=fused, cudnn_benchmark=bench,
                    cuda_graph=graph, compile_auto=auto, layout_opt=bool(tcfg.layout_opt))


def make_optimizer(params, tcfg, fast: FastPath) -> torch.optim.Optimizer:
    kw = {"fused": True} if fast.fused_optimizer else {}
    if fast.cuda_graph:
        kw["capturable"] = True  # step counters on the device, no host reads: safe to capture
    return torch.optim.Adam(params, lr=tcfg.lr, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps,
                            weight_decay=tcfg.weight_decay, **kw)


def lr_factor(schedule: str, warmup: int, total: int):
    """iteration -> the factor of train.lr at that optimizer step: diffusers' schedule functions
    (`diffusers.optimization.get_scheduler`, as diffusers' train_unconditional.py), used statelessly so
    that a resumed run, or a ticket's new optimizer, continues the schedule exactly."""
    if schedule == "constant" and warmup == 0:
        return lambda it: 1.0
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if schedule == "constant" else schedule
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total).lr_lambdas[0]


OPT_SETTINGS = {"lr": "train.lr", "betas": "train.adam_betas", "eps": "train.adam_eps",
                "weight_decay": "train.weight_decay"}  # Adam's param-group keys and their settings


def apply_hparams(opt: torch.optim.Optimizer, tcfg, lr: float | None = None) -> list[str]:
    """Set the optimizer's lr (`lr`: the schedule's value now; default train.lr), betas, eps and weight
    decay from the config (a resumed optimizer state carries the old ones); returns 'setting old -> new'
    for each that changed."""
    want = {"lr": tcfg.lr if lr is None else lr, "betas": tuple(tcfg.adam_betas), "eps": tcfg.adam_eps, "weight_decay": tcfg.weight_decay}
    changed = []
    for k, v in want.items():
        g0 = opt.param_groups[0][k]
        old = tuple(float(b) for b in g0) if k == "betas" else float(g0)
        if old != v:
            changed.append(f"{OPT_SETTINGS[k]} {old} -> {v}")
        for g in opt.param_groups:
            g[k] = torch.as_tensor(v, device=g[k].device) if isinstance(g[k], torch.Tensor) else v
    return changed


class EMA:
    """Exponential moving average of a model's floating-point state, kept as a full module copy.

    The decay of the n-th update (`decay_at`): `decay`; with `warmup` min(decay, (1 + n) / (10 + n));
    with `power` diffusers' EMAModel warm-up exactly (`EMAModel.get_decay` with use_ema_warmup: the
    first update copies, then 1 - (1 + (n - 1) / inv_gamma) ** -power, clamped to [min_decay, decay]).
    For the first `start` steps the EMA copies the online weights (EMAModel's `update_after_step`); it is
    updated every `every` steps."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False, power: float | None = None,
                 inv_gamma: float = 1.0, min_decay: float = 0.0, start: int = 0, every: int = 1):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.power, self.inv_gamma = decay, warmup, power, inv_gamma
        self.min_decay, self.start, self.every = min_decay, start, every
        self.updates, self.steps = 0, 0  # EMA updates made; optimizer steps seen
        self._src = [p for p in model.state_dict().values() if p.is_floating_point()]
        self._dst = [p for p in self.module.state_dict().values() if p.is_floating_point()]

    @classmethod
    def from_config(cls, model: nn.Module, tcfg) -> "EMA":
        return cls(model, tcfg.ema_decay, tcfg.ema_warmup, tcfg.ema_power, tcfg.ema_inv_gamma, tcfg.ema_min_decay,
                   tcfg.ema_start, tcfg.ema_every)

    def decay_at(self, n: int) -> float:
        if self.power is not None:
            if n <= 1:
                return 0.0
            d = 1 - (1 + (n - 1) / self.inv_gamma) ** -self.power
        elif self.warmup:
            d = (1 + n) / (10 + n)
        else:
            return self.decay
        return max(min(d, self.decay), self.min_decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        if self.steps <= self.start:
            torch._foreach_copy_(self._dst, self._src)
            return
        if (self.steps - self.start) % self.every:
            return
        self.updates += 1
        torch._foreach_lerp_(self._dst, self._src, 1.0 - self.decay_at(self.updates))


def restricted(dense: torch.Tensor, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`dense` restricted to the entries `idx` (`pruning.kept_entries`), laid out like `like` (its memory format)."""
    return torch.empty_like(like).copy_(dense.reshape(-1)[idx.to(dense.device)].view(idx.shape))


@torch.no_grad()
def carry_ema(dense: EMA, ema: EMA, kept: dict[str, torch.Tensor]) -> None:
    """Make `ema` (of a pruned model) the dense EMA restricted to the kept entries, its update counts included."""
    src = dense.module.state_dict()
    for name, v in ema.module.state_dict().items():
        if v.is_floating_point():
            v.copy_(restricted(src[name], kept[name], v))
    ema.updates, ema.steps = dense.updates, dense.steps


def carry_optimizer(dense: torch.optim.Optimizer, dense_model: nn.Module, opt: torch.optim.Optimizer,
                    model: nn.Module, kept: dict[str, torch.Tensor]) -> None:
    """Give `opt` (over a pruned `model`) the dense optimizer's per-parameter state restricted to the kept
    entries: Adam's moments sliced, its step counts copied."""
    dense_params = dict(dense_model.named_parameters())
    for name, p in model.named_parameters():
        q = dense_params[name]
        opt.state[p] = {k: restricted(v, kept[name], p) if torch.is_tensor(v) and v.shape == q.shape
                        else v.clone() if torch.is_tensor(v) else v for k, v in dense.state.get(q, {}).items()}


def prepare_model(model: nn.Module, fast: FastPath) -> nn.Module:
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def compile_options(fast: FastPath) -> dict:
    """torch.compile's inductor options for a fast path: its mode's options (torch.compile takes a mode
    or options, not both) plus the forced layout optimisation. Applied to the backward compile too."""
    from torch._inductor import list_mode_options

    opts = dict(list_mode_options(fast.compile))
    if fast.layout_opt:
        opts["force_layout_optimization"] = True
    return opts


class StepClock:
    """Seconds of a step function from the outside: the first call (compilation) and a steady step
    (`window` calls after `settle` untimed ones). Synchronises a GPU only at the edges of what it times."""

    def __init__(self, device_type: str, settle: int, window: int):
        self.cuda, self.settle, self.window = device_type == "cuda", settle, window
        self.calls, self.first_s, self.step_s, self._t0 = 0, None, None, None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def before(self) -> None:
        if self.calls == 0 or self.calls == self.settle:
            self._t0 = self._now()

    def after(self) -> bool:
        """True when this call completed the measurement of the steady step."""
        self.calls += 1
        if self.calls == 1:
            self.first_s = self._now() - self._t0
        elif self.calls == self.settle + self.window and self._t0 is not None and self.settle > 0:
            self.step_s = (self._now() - self._t0) / self.window
            return True
        return False


class TrainStep:
    """step(x0, t, noise) -> detached loss. `model` may be DDP-wrapped; `raw` is the module itself.

    cache: the compile cache (`compile_cache.CompileCache`): its artifacts are loaded before this shape's
    first compiled step and saved after it, and the measured step and compile seconds are recorded.
    planned_iters(): the iterations this shape will still train (train.compile=auto). on_decision(d):
    called once with the auto decision (a dict with its one-line `reason`); default: printed."""

    COMPILED_SETTLE, COMPILED_WINDOW = 4, 10  # reduce-overhead records its CUDA graphs in the first calls

    def __init__(self, model: nn.Module, raw: nn.Module, opt: torch.optim.Optimizer, ema: EMA | None,
                 loss: DiffusionLoss, grad_clip: float, fast: FastPath, skip_nonfinite: bool = False,
                 accum: int = 1, *, cache=None, planned_iters=None, on_decision=None, measure: bool = True):
        """loss: the objective (schedule, weights, reduction) with its tensors on the training device.
        skip_nonfinite: a step whose loss or gradient norm is not finite changes nothing and returns None
        (one host read of the norm per step). accum: the batch is split into `accum` micro-batches whose
        gradients add up before the one optimizer step (gradient accumulation; same result as the whole
        batch, less activation memory)."""
        self.model, self.raw, self.opt, self.ema, self.loss = model, raw, opt, ema, loss
        self._call = eps_call(raw)  # the backbone's eps call, applied to `model` (compiled or wrapped)
        self.grad_clip, self.fast, self.skip_nonfinite, self.accum = grad_clip, fast, skip_nonfinite, accum
        self.params = [p for p in raw.parameters() if p.requires_grad]
        self.device_type = loss.sqrt_ab.device.type
        self._graph, self._warm = None, 0  # the whole-step CUDA graph (fast.cuda_graph), once captured
        if self.device_type == "cuda":  # a process-wide switch: each step sets the one its mode asks for
            torch.backends.cudnn.benchmark = fast.cudnn_benchmark
        # the cache's folder is used by compiled steps, and on a GPU to record uncompiled step times too
        used = cache is not None and (fast.compile != "none" or self.device_type == "cuda")
        self.cache = cache if used and cache.activate() else None
        self.planned_iters, self.measure, self._started = planned_iters, measure, False
        self.on_decision = on_decision or (lambda d: print(d["reason"], flush=True))
        self.decision: dict | None = None
        self.keys: dict[str, str] = {}
        self.forward_loss = self._forward_loss
        self._clock: StepClock | None = None
        self._counters, self._save_pending = None, False
        self.cache_hit: bool | None = None  # whether the compile cache served this step's compilation
        if fast.compile != "none" and not fast.compile_auto:
            self._compile()

    # ------------------------------------------------------------------ compilation
    def _compile(self) -> None:
        # A new compiled step replaces the previous one (the dense model's, an earlier run's in
        # `ebdiff experiment`): dropping dynamo's caches frees that step's CUDA-graph memory, and keeps
        # `_forward_loss` under dynamo's recompile limit (8 entries per function), past which later model
        # shapes would silently run eager.
        torch._dynamo.reset()
        self.forward_loss = torch.compile(self._forward_loss, options=compile_options(self.fast))

    def key(self, compile_mode: str, x0: torch.Tensor) -> str:
        """The compile cache's key of this step's shape with `compile_mode` (`none`: the uncompiled step)."""
        if compile_mode not in self.keys:
            from .compile_cache import cache_key

            settings = dict(self.fast.to_dict(), compile=compile_mode)
            settings.pop("compile_auto")
            extra = {"x0": list(x0.shape), "dropout": getattr(getattr(self.raw, "config", None), "dropout", None),
                     "reduction": self.loss.reduction, "weighted": self.loss.weights is not None}
            self.keys[compile_mode] = cache_key(self.raw, settings, self.loss.sqrt_ab.device, extra)
        return self.keys[compile_mode]

    def _start(self, x0: torch.Tensor) -> None:
        """Before the first step: the auto decision when the records already allow it, the cache's artifacts,
        and what this step measures."""
        if self.fast.compile_auto:
            self._decide(x0, None)
        if self.fast.compile_auto:  # not decided yet: measure the uncompiled step first
            self._clock = StepClock(self.device_type, autocompile.EAGER_SETTLE, autocompile.EAGER_WINDOW)
            return
        self._begin_phase(x0)

    def _begin_phase(self, x0: torch.Tensor) -> None:
        compiled = self.fast.compile != "none"
        if compiled and self.cache is not None:
            from .compile_cache import compile_counters

            self.cache.load_artifacts(self.key(self.fast.compile, x0))
            self._counters = compile_counters()
            self._save_pending = True
        if self.measure and (compiled or self.device_type == "cuda"):
            settle = self.COMPILED_SETTLE if compiled else autocompile.EAGER_SETTLE
            self._clock = StepClock(self.device_type, settle, self.COMPILED_WINDOW)
        else:
            self._clock = None

    def _decide(self, x0: torch.Tensor, measured_s: float | None) -> None:
        """train.compile=auto: decide from the measured uncompiled step (or a recorded one) and the records;
        where a number is missing, keep today's behaviour (compile on a GPU)."""
        f, mode, cache = self.fast, self.fast.compile, self.cache
        rec_e = cache.timings(self.key("none", x0)) if cache is not None else {}
        rec_c = cache.timings(self.key(mode, x0)) if cache is not None else {}
        eager_s = measured_s if measured_s is not None else rec_e.get("step_s")
        if eager_s is None and not f.cuda_graph:
            return  # measure it in this run's first steps
        cached = cache is not None and (cache.has_artifacts(self.key(mode, x0)) or "compile_miss_s" in rec_c
                                        or "compile_hit_s" in rec_c)
        step_c, comp_s, src = autocompile.estimate(eager_s, rec_c, self.device_type == "cuda", cached, f.cuda_graph)
        planned = max(0, int(self.planned_iters())) if self.planned_iters is not None else None
        src = f"uncompiled step {'measured' if measured_s is not None else 'recorded'}" + (f", {src}" if src else "")
        if planned is None or eager_s is None or step_c is None or comp_s is None:
            go = self.device_type == "cuda"
            d = {"compile": go, "reason": f"not enough measured timings for this shape ({src}): today's default"}
        else:
            d = autocompile.decide_compile(planned, eager_s, step_c, comp_s, sources=src).to_dict()
            go = d["compile"]
        d["mode"] = mode if go else "none"
        d["reason"] = f"train.compile=auto: {'compiling (' + mode + ')' if go else 'not compiling'}: {d['reason']}"
        self.decision = d
        self.fast = replace(f, compile=mode if go else "none", compile_auto=False)
        if go:
            self._compile()
        self.on_decision(d)

    def record_timing(self, x0: torch.Tensor, step_s: float, compile_s: float | None = None,
                      mode: str | None = None) -> None:
        """Record a steady step time (and the compile overhead of the first steps) for this shape and
        `mode` (default: the step's compile mode)."""
        cache = self.cache
        if cache is None:
            return
        from .compile_cache import compile_counters, was_hit

        mode = self.fast.compile if mode is None else mode
        vals = {"step_s": step_s}
        if mode != "none" and self._counters is not None:
            hit = was_hit(self._counters, compile_counters())
            self.cache_hit = hit
            if compile_s is not None and hit is not None:
                vals["compile_hit_s" if hit else "compile_miss_s"] = max(0.0, compile_s)
        cache.record(self.key(mode, x0), **vals)

    # ------------------------------------------------------------------ the step
    def _eps(self, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        # autocast's weight cache must be off under graph capture (PyTorch's CUDA graphs notes)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.fast.bf16,
                            cache_enabled=not self.fast.cuda_graph):
            return self._call(self.model, xt, t, cond)

    def _forward_loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                      cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.loss(self._eps, x0, noise, t, cond)

    def _update(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """Forward, backward, clip, Adam, EMA: the work one step does (and what the graph captures).
        None: a non-finite step skipped (skip_nonfinite). cond: class labels (class-conditional models)."""
        if self.accum == 1:
            loss = self.forward_loss(x0, t, noise, cond)
            loss.backward()
        else:
            loss = 0.0
            conds = [None] * self.accum if cond is None else cond.chunk(self.accum)
            for i, (xi, ti, ni, ci) in enumerate(zip(x0.chunk(self.accum), t.chunk(self.accum), noise.chunk(self.accum),
                                                     conds)):
                last = i == self.accum - 1  # DDP all-reduces the gradients once, after the last micro-batch
                with contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync():
                    li = self.forward_loss(xi, ti, ni, ci) / self.accum
                    li.backward()
                loss = loss + li.detach()
        if self.grad_clip > 0 or self.skip_nonfinite:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf"), foreach=True)
            if self.skip_nonfinite and not bool(torch.isfinite(norm) & torch.isfinite(loss)):
                return None
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.raw)
        return loss.detach()

    def __call__(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 cond: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.fast.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
            noise = noise.contiguous(memory_format=torch.channels_last)
        if not self._started:
            self._started = True
            self._start(x0)
        clock = self._clock
        if clock is not None:
            clock.before()
        if self.fast.cuda_graph:
            loss = self._graph_step(x0, t, noise, cond)
        else:
            loss = self._update(x0, t, noise, cond)
            self.opt.zero_grad(set_to_none=True)
        if self._save_pending:  # after the shape's first full compiled step (forward and backward)
            self._save_pending = False
            self.cache.save_artifacts(self.key(self.fast.compile, x0))
        if clock is not None and clock.after():
            self._measured(clock, x0)
        return loss

    def _measured(self, clock: StepClock, x0: torch.Tensor) -> None:
        if self.fast.compile_auto:  # the uncompiled steps are measured: decide, then time the chosen step
            self.record_timing(x0, clock.step_s, mode="none")
            self._decide(x0, clock.step_s)
            self._begin_phase(x0)
            return
        self._clock = None
        compiled = self.fast.compile != "none"
        self.record_timing(x0, clock.step_s, (clock.first_s - clock.step_s) if compiled else None)

    GRAPH_WARMUP = 3  # eager steps before the capture (lazy cuBLAS/cuDNN/autograd set-up, compilation)

    def _graph_step(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    cond: torch.Tensor | None = None) -> torch.Tensor:
        """Whole-step CUDA graph, as in PyTorch's "whole-network capture": a few eager steps on a side
        stream, then one capture of `_update` over static input buffers; every later step copies its
        batch into those buffers and replays the graph: one launch per step. Every call is exactly one
        training step (the capture call replays once). The returned loss is the graph's static output:
        read it before the next call (the trainer adds it to its running sum at once)."""
        if self._graph is not None:
            for buf, v in zip(self._static_in, (x0, t, noise, cond)):
                if buf is not None:
                    buf.copy_(v)
            self._graph.replay()
            if self.ema is not None:  # the captured update does not run Python (a fixed decay, every step)
                self.ema.updates += 1
                self.ema.steps += 1
            return self._static_loss
        if self._warm < self.GRAPH_WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self._update(x0, t, noise, cond)
                self.opt.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(side)
            self._warm += 1
            return loss.clone()  # owned by the current stream
        self._static_in = [x0.clone(), t.clone(), noise.clone(), None if cond is None else cond.clone()]  # clone keeps channels_last
        self.opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients: static
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_loss = self._update(*self._static_in)
        self._graph.replay()
        return self._static_loss
