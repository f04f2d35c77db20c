"""Samplers over any eps-model callable `f(x, t) -> eps`, in a registry with one signature.

Every sampler is `fn(model, x, schedule, timesteps, *, generator=None, **options)`: x = x_T, the
visited `timesteps` ascending. The model is a plain callable, so a single UNet, an EMA copy or a
region router plug in the same way (the k-diffusion convention); a model that implements `Routed`
(the TA-EB `RegionRouter`) is asked for the model of each step's Python timestep. Class labels and
classifier-free guidance reach the model through one wrapper, `conditioned` (an eps callable
f(x, t, cond) with the labels bound), so no sampler knows about conditions.

Adding a sampler is one function and one `register_sampler(name, timesteps_fn, options)` line.
diffusers' schedulers join the registry as `diffusers-<name>` from `interop.py` (their one home), which
registers them when it is imported; the entry points (the CLI, `import ebdiff`'s API) call
`interop.register_diffusers_samplers()` so they are there before a config is validated.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch

from ..progress import progress_bar
from .diffusion import Schedule

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SPACINGS = ("quad", "uniform", "trailing")


@runtime_checkable
class Routed(Protocol):
    """An eps model made of several models, one per timestep (TA-EB): the samplers call `at(t)` with the
    step's Python int, so routing needs no read-back of a device tensor."""

    def at(self, t: int) -> EpsModel: ...


def model_at(model: EpsModel, t: int) -> EpsModel:
    """The eps model serving timestep t: `model.at(t)` for a `Routed` model, else the model itself."""
    return model.at(t) if isinstance(model, Routed) else model


class Conditioned:
    """An eps model f(x, t, cond) with the class labels of one batch bound: f(x, t) -> eps. With `guidance`
    s (classifier-free guidance): eps(x, null) + s * (eps(x, labels) - eps(x, null)), both halves in one
    batched call. It routes like the model it wraps (`at(t)` binds the labels to the model of step t), so a
    TA-EB router hands them to the ticket of each step."""

    def __init__(self, model: Callable, labels: torch.Tensor, guidance: float | None = None, null: int | None = None):
        if guidance is not None and null is None:
            raise ValueError("classifier-free guidance needs the null class index")
        self.model, self.labels, self.guidance, self.null = model, labels, guidance, null

    def at(self, t: int) -> "Conditioned":
        return Conditioned(model_at(self.model, t), self.labels, self.guidance, self.null)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = self.labels.to(x.device)
        if self.guidance is None:
            return self.model(x, t, y)
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null)]))
        cond, uncond = both.float().chunk(2)
        return uncond + self.guidance * (cond - uncond)


def conditioned(model: Callable, labels: torch.Tensor | None, guidance: float | None = None,
                null: int | None = None) -> Callable:
    """`model` with class labels bound (see `Conditioned`); the model itself when labels is None."""
    return model if labels is None else Conditioned(model, labels, guidance, null)


def class_rows(num_classes: int, n: int, classes: list[int] | None = None) -> tuple[torch.Tensor, int | None]:
    """Labels for n samples of a class-conditional model and the grid row length that gives one row per class:
    `classes` (default all) each repeated ceil(n / len) times in turn; when there are more classes than
    samples, one sample per class of the first n (no row layout: None)."""
    classes = list(range(num_classes)) if classes is None else list(classes)
    if n < len(classes):
        return torch.tensor(classes[:n], dtype=torch.long), None
    per = -(-n // len(classes))
    return torch.tensor([classes[i // per] for i in range(n)], dtype=torch.long), per


def ddim_timesteps(T: int, steps: int, spacing: str = "quad") -> list[int]:
    """Ascending list of the timesteps a DDIM sampler visits.

    quad: the reference code's t_i = int(linspace(0, sqrt(0.8 T), steps)^2) (largest t ~ 0.8 T);
    uniform: 0, T/steps, 2T/steps, ... ("leading"); trailing: ..., T-1.
    """
    if not 0 < steps <= T:
        raise ValueError(f"steps must be in 1..{T}; got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing '{spacing}' (known: {', '.join(SPACINGS)})")
    if spacing == "quad":
        seq = (np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(int)
    elif spacing == "uniform":
        seq = np.arange(0, T, T // steps)[:steps]
    else:  # trailing
        seq = np.round(np.arange(T, 0, -T / steps)).astype(int)[::-1] - 1
    return [int(s) for s in seq]


def _abar_at(abar: torch.Tensor, t: int) -> float:
    return 1.0 if t < 0 else float(abar[t])


@torch.no_grad()
def ddim_sample(model: EpsModel, x: torch.Tensor, schedule: Schedule, timesteps: list[int], *,
                eta: float = 0.0, generator: torch.Generator | None = None, clip_x0: bool = False) -> torch.Tensor:
    """DDIM (Song et al.) from x_T = x over the given ascending timesteps; eta=0 is deterministic."""
    abar = schedule.alphas_cumprod
    prev = [-1] + timesteps[:-1]
    for t, tn in zip(reversed(timesteps), reversed(prev)):
        at, an = _abar_at(abar, t), _abar_at(abar, tn)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = model_at(model, t)(x, tt).float()
        x0 = (x - eps * (1 - at) ** 0.5) / at ** 0.5
        if clip_x0:  # then eps is re-derived from the clipped x0 (as diffusers' clip_sample)
            x0 = x0.clamp(-1, 1)
            eps = (x - at ** 0.5 * x0) / (1 - at) ** 0.5
        c1 = eta * ((1 - at / an) * (1 - an) / (1 - at)) ** 0.5
        c2 = max(1 - an - c1 ** 2, 0.0) ** 0.5
        x = an ** 0.5 * x0 + c2 * eps
        if c1 > 0:
            x = x + c1 * torch.randn(x.shape, generator=generator, device=x.device)
    return x


@torch.no_grad()
def ddpm_sample(model: EpsModel, x: torch.Tensor, schedule: Schedule, timesteps: list[int] | None = None, *,
                variance: str = "fixedlarge", clip_x0: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestral DDPM sampling over all T steps (variance 'fixedlarge' = beta_t, as the reference; the
    predicted x0 clipped to [-1, 1], as the reference). `timesteps` must be all of 0..T-1 if given."""
    if timesteps is not None and list(timesteps) != list(range(schedule.T)):
        raise ValueError("DDPM visits every timestep 0..T-1")
    abar = schedule.alphas_cumprod
    for t in reversed(range(schedule.T)):
        at, an = _abar_at(abar, t), _abar_at(abar, t - 1)
        beta = 1 - at / an
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = model_at(model, t)(x, tt).float()
        x0 = (x - eps * (1 - at) ** 0.5) / at ** 0.5
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        mean = (an ** 0.5 * beta * x0 + (1 - beta) ** 0.5 * (1 - an) * x) / (1 - at)
        if t > 0:
            if variance == "fixedlarge":
                var = beta  # the reference: log(beta_t) for every t > 0
            else:
                var = beta * (1 - an) / (1 - at)
            x = mean + var ** 0.5 * torch.randn(x.shape, generator=generator, device=x.device)
        else:
            x = mean
    return x


@dataclass(frozen=True)
class SamplerSpec:
    fn: Callable[..., torch.Tensor]
    timesteps: Callable[[int, int, str], list[int]]  # (T, steps, spacing) -> the visited timesteps, ascending
    options: tuple[str, ...]  # the sample.* settings it takes as keyword arguments


SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(name: str, timesteps: Callable[[int, int, str], list[int]], options: tuple[str, ...] = ()):
    """Decorator: make fn(model, x, schedule, timesteps, *, generator, **options) the sampler `name`
    (`sample.sampler`, `ebdiff sample --sampler`)."""

    def deco(fn):
        SAMPLERS[name] = SamplerSpec(fn, timesteps, tuple(options))
        return fn

    return deco


register_sampler("ddim", ddim_timesteps, ("eta", "clip_x0"))(ddim_sample)
register_sampler("ddpm", lambda T, steps, spacing: list(range(T)), ("variance",))(ddpm_sample)


def sampler_timesteps(sampler: str, T: int, steps: int, spacing: str = "quad") -> list[int]:
    """The timesteps a sampler visits (TA-EB weights its sizes by them)."""
    return SAMPLERS[sampler].timesteps(T, steps, spacing)


def visited_timesteps(scfg, T: int) -> list[int]:
    """The timesteps sampling with these sample settings (sampler, steps, spacing) visits, ascending."""
    return sampler_timesteps(scfg.sampler, T, scfg.steps, scfg.spacing)


def generate(model: EpsModel, n: int, shape: tuple[int, int, int], schedule: Schedule, *,
             sampler: str = "ddim", steps: int = 100, spacing: str = "quad", batch_size: int = 256, seed: int = 0,
             device: torch.device | str = "cpu", progress: bool = False, labels: torch.Tensor | None = None,
             guidance: float | None = None, null_class: int | None = None, clamp: bool = True,
             **options) -> torch.Tensor:
    """n images in [-1, 1] as a float tensor on the CPU. Batch b uses seed (seed, b): reproducible.
    labels: n class labels of a class-conditional model (with `guidance` s and the `null_class` index:
    classifier-free guidance). clamp=False (latents): nothing is clipped to [-1, 1], neither the output nor a
    sampler's predicted x0. options: sampler settings (eta, clip_x0, variance); each sampler takes those it
    knows."""
    spec = SAMPLERS[sampler]
    kw = {k: v for k, v in options.items() if k in spec.options}
    if not clamp and "clip_x0" in inspect.signature(spec.fn).parameters:
        kw["clip_x0"] = False  # a latent's range is not [-1, 1]
    timesteps = spec.timesteps(schedule.T, steps, spacing)
    out = []
    n_batches = (n + batch_size - 1) // batch_size
    for b in progress_bar(range(n_batches), desc=f"sampling ({sampler})", disable=not progress, leave=False):
        m = min(batch_size, n - b * batch_size)
        g = torch.Generator(device=device).manual_seed(seed * 100_003 + b)
        x = torch.randn((m, *shape), generator=g, device=device)
        fn = model if labels is None else conditioned(model, labels[b * batch_size: b * batch_size + m], guidance,
                                                      null_class)
        x = spec.fn(fn, x, schedule, timesteps, generator=g, **kw)
        out.append(x.clamp(-1, 1).cpu() if clamp else x.cpu())
    return torch.cat(out)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> NHWC uint8."""
    x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()

