"""Noise schedule, forward process, training loss and timestep samplers (pure tensor code)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Schedule:
    """Discrete DDPM schedule. All tensors float64 on the CPU; index with integer timesteps."""

    betas: torch.Tensor

    @property
    def T(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        return cls(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008) -> "Schedule":
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
        return cls(betas)

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.0015, beta_end: float = 0.0195) -> "Schedule":
        """LDM's "linear" schedule (diffusers' scaled_linear): betas = linspace(sqrt(start), sqrt(end), T)^2."""
        return cls(torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2)

    @classmethod
    def from_config(cls, d) -> "Schedule":
        if d.beta_schedule == "cosine":
            return cls.cosine(d.timesteps)
        if d.beta_schedule == "scaled_linear":
            return cls.scaled_linear(d.timesteps, d.beta_start, d.beta_end)
        return cls.linear(d.timesteps, d.beta_start, d.beta_end)


class DiffusionLoss:
    """The DDPM training objective, in one place: forward noising, the eps-prediction error, per-timestep
    weights (Min-SNR, SpeeD) and the reduction over pixels; `timesteps` draws training timesteps.

    `loss(eps_model, x0, noise, t)` is what the training step, Taylor/Diff-Pruning scoring and
    `ebdiff bench` compute (the NVlabs/edm `training/loss.py` shape: hyper-parameters in the
    constructor, one call). `eps_model(x_t, t) -> eps` is any callable (a UNet wrapped by
    `backbones.eps_fn`, under autocast or not); a class-conditional one also takes the labels, eps_model(x_t, t, cond)."""

    def __init__(self, schedule: Schedule, timesteps: "TimestepSampler | None" = None,
                 weights: torch.Tensor | None = None, reduction: str = "mean",
                 device: torch.device | str = "cpu"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"unknown loss reduction '{reduction}' (mean or sum)")
        abar = schedule.alphas_cumprod
        self.schedule, self.reduction = schedule, reduction
        self.timesteps = timesteps or TimestepSampler(0, schedule.T - 1)
        self.sqrt_ab = abar.sqrt().float().to(device)
        self.sqrt_1mab = (1 - abar).sqrt().float().to(device)
        self.weights = None if weights is None else weights.float().to(device)

    @classmethod
    def from_config(cls, dcfg, device: torch.device | str = "cpu") -> "DiffusionLoss":
        schedule = Schedule.from_config(dcfg)
        return cls(schedule, make_timestep_sampler(dcfg), loss_weights(dcfg, schedule), dcfg.loss_reduction, device)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        a = self.sqrt_ab.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        s = self.sqrt_1mab.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return a * x0 + s * noise

    def __call__(self, eps_model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                 cond: torch.Tensor | None = None) -> torch.Tensor:
        """cond: class labels of a class-conditional model, passed on as eps_model(x_t, t, cond)."""
        xt = self.noised(x0, t, noise)
        pred = eps_model(xt, t) if cond is None else eps_model(xt, t, cond)
        return eps_loss(pred, noise, self.reduction, None if self.weights is None else self.weights[t])


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (a `DiffusionLoss.noised` without a loss object)."""
    return DiffusionLoss(schedule, device=x0.device).noised(x0, t, noise)


def eps_loss(pred: torch.Tensor, noise: torch.Tensor, reduction: str = "mean",
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample squared error reduced over C,H,W ('mean' or 'sum'), then averaged over the batch."""
    err = (pred.float() - noise.float()).pow(2).flatten(1)
    per_sample = err.mean(1) if reduction == "mean" else err.sum(1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


class TimestepSampler:
    """Draws training timesteps in [lo, hi] (inclusive): uniform, antithetic pairs (t, lo+hi-t), or
    from given per-timestep probabilities (SpeeD), renormalised inside the range.

    dual=m (SpeeD's "dual" sampling): half the batch is drawn from `probs`, the other half is its
    reflection about m (m - t for t < m, t - m otherwise, as in the SpeeD code). Inside a region a
    reflection that leaves [lo, hi] is replaced by the region's antithetic partner lo + hi - t."""

    def __init__(self, lo: int, hi: int, antithetic: bool = True, probs: torch.Tensor | None = None,
                 dual: int | None = None):
        if not 0 <= lo <= hi:
            raise ValueError(f"bad timestep range [{lo}, {hi}]")
        if dual is not None and probs is None:
            raise ValueError("dual sampling needs probs")
        self.lo, self.hi, self.antithetic, self.dual = lo, hi, antithetic and probs is None, dual
        self.probs = None
        if probs is not None:
            p = probs[lo: hi + 1].double()
            self.probs = p / p.sum()

    def __call__(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
        if self.probs is not None and self.dual is not None:
            half = (n + 1) // 2
            t = torch.multinomial(self.probs, half, replacement=True, generator=generator) + self.lo
            m = self.dual
            r = torch.where(t < m, m - t, t - m)
            r = torch.where((r < self.lo) | (r > self.hi), self.lo + self.hi - t, r)
            t = torch.cat([t, r])[:n]
        elif self.probs is not None:
            t = torch.multinomial(self.probs, n, replacement=True, generator=generator) + self.lo
        elif self.antithetic:
            half = (n + 1) // 2
            t = torch.randint(self.lo, self.hi + 1, (half,), generator=generator)
            t = torch.cat([t, self.lo + self.hi - t])[:n]
        else:
            t = torch.randint(self.lo, self.hi + 1, (n,), generator=generator)
        return t.to(device)


def speed_probabilities(T: int, tau: int = 700, k: float = 5.0) -> torch.Tensor:
    """SpeeD sampling: P(t) = k / (tau k + T - tau) for t < tau, 1 / (tau k + T - tau) for t >= tau."""
    z = tau * k + T - tau
    p = torch.full((T,), 1.0 / z, dtype=torch.float64)
    p[:tau] = k / z
    return p


def speed_meaningful_step(schedule: Schedule, threshold: float = 1e-4) -> int:
    """SpeeD's m: the first t where d/dt sqrt(1 - abar_t) < threshold, plus 1 (642 for the linear
    schedule with T = 1000). The "dual" sampler reflects about it."""
    g = np.gradient((1 - schedule.alphas_cumprod).sqrt().numpy())
    return int(np.argmax(g < threshold)) + 1


def speed_weights(schedule: Schedule, tau: int = 700, lam: float = 0.6) -> torch.Tensor:
    """SpeeD change-aware weights: for t < tau, (1 - lam) + (2 lam - 1) (g_t - min g) / (max g - min g)
    with g_t = d/dt (1 - abar_t) (np.gradient); 1 for t >= tau."""
    g = torch.from_numpy(np.gradient((1 - schedule.alphas_cumprod).numpy()))
    w = torch.ones(schedule.T, dtype=torch.float64)
    gt = g[:tau]
    w[:tau] = (1 - lam) + (2 * lam - 1) * (gt - gt.min()) / (gt.max() - gt.min())
    return w


def min_snr_weights(schedule: Schedule, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma for epsilon prediction: min(SNR_t, gamma) / SNR_t, SNR_t = abar / (1 - abar)."""
    ab = schedule.alphas_cumprod
    snr = ab / (1 - ab)
    return torch.clamp(snr, max=gamma) / snr


def loss_weights(dcfg, schedule: Schedule) -> torch.Tensor | None:
    if dcfg.loss_weighting == "min-snr":
        return min_snr_weights(schedule, dcfg.min_snr_gamma)
    if dcfg.loss_weighting == "speed":
        return speed_weights(schedule, dcfg.speed_tau, dcfg.speed_lambda)
    return None


def make_timestep_sampler(dcfg) -> TimestepSampler:
    """Draws inside diffusion.t_min..t_max (the whole range unless a TA-EB region): antithetic,
    uniform, SpeeD or SpeeD-dual (renormalised inside the range)."""
    hi = dcfg.timesteps - 1 if dcfg.t_max is None else dcfg.t_max
    speed = dcfg.timestep_sampler.startswith("speed")
    probs = speed_probabilities(dcfg.timesteps, dcfg.speed_tau, dcfg.speed_k) if speed else None
    dual = speed_meaningful_step(Schedule.from_config(dcfg)) if dcfg.timestep_sampler == "speed-dual" else None
    return TimestepSampler(dcfg.t_min, hi, antithetic=dcfg.timestep_sampler == "antithetic", probs=probs, dual=dual)


def class_dropout(labels: torch.Tensor, p: float, null: int, seed: int) -> torch.Tensor:
    """Labels with each replaced by the null class with probability p (classifier-free guidance training);
    the draw is a function of `seed` (the iteration's) and of nothing else: exact resume."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape[0], generator=torch.Generator().manual_seed(seed + 7_777_777)) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, null), labels)
